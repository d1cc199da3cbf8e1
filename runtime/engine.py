"""A loaded engine: manifest + step program + tokenizer + the decode loop.

Importing this module (and running an ORT engine) needs numpy, onnxruntime, tokenizers
and pydantic only; the eager and aoti backends import torch when, and only when, they are
loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from leapc.ir.errors import (
    EngineError,
    InputError,
    LeapcUserError,
    parse_choice,
    require_utf8,
)
from leapc.runtime.backends.base import BACKENDS, Device
from leapc.runtime.batching import RowSlicing, Scheduler, Sequence
from leapc.runtime.datastore import Datastore
from leapc.runtime.decode import GenerationStats, StopConfig, TimedProgram, decode
from leapc.runtime.diffusion import Chooser, DiffusionOptions, UnmaskingRule, decode_blocks
from leapc.runtime.drafters.base import Drafter
from leapc.runtime.healing import CompletionText, Healing, TokenTexts, heal
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.manifest import Backend, Manifest, read_manifest
from leapc.runtime.policies import (
    AUTO_POLICY,
    POLICIES,
    DraftContext,
    DraftOptions,
    Policy,
    new_cache,
    required_programs,
)
from leapc.runtime.prefix_cache import PrefixCache
from leapc.runtime.sampling import SamplingConfig, TypicalAcceptance
from leapc.runtime.step import StepFunction


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # new tokens only
    text: str
    stats: GenerationStats


@dataclass(frozen=True)
class StreamChunk:
    token_ids: list[int]  # the last chunk, holding the flushed tail, may have none
    text: str  # the text that became final with these tokens (runtime/detokenize.py)


@dataclass
class Stream:
    """Iterate for `StreamChunk`s; ``token_ids`` and ``stats`` fill in as it runs."""

    _tokens: Iterator[list[int]]
    _tokenizer: Tokenizer
    stats: GenerationStats
    healing: Healing | None = None
    token_ids: list[int] = field(default_factory=list)
    _texts: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[StreamChunk]:
        """The chunks' texts join to `text`: each is final when yielded (never part of a
        character), and what generation ends on is flushed in a last, token-less chunk."""
        text = CompletionText(self._tokenizer, self.healing)
        for new in self._tokens:
            self.token_ids.extend(new)
            self._texts.append(text.push(new))
            yield StreamChunk(new, self._texts[-1])
        self._texts.append(text.flush())
        if self._texts[-1]:
            yield StreamChunk([], self._texts[-1])

    @property
    def text(self) -> str:
        """The completion's text so far (whole once iterated); with healing, without the
        prompt's backed-up text."""
        return "".join(self._texts)


@dataclass(frozen=True)
class _Run:
    """One request, set up: what its decode loop (or a scheduler's row) runs with."""

    policy: Policy
    ids: list[int]
    sampling: SamplingConfig
    stats: GenerationStats
    cache: KVCache
    drafter: Drafter
    stop: StopConfig
    rng: np.random.Generator
    healing: Healing | None  # ``ids`` is then the prompt backed up by its last token
    unmasking: UnmaskingRule | None = None  # a block-diffusion policy's (no drafter then)

    def loop(self, engine: Engine) -> Iterator[list[int]]:
        """The single-request decode loop over ``engine``'s ``full`` program."""
        step, m = TimedProgram("full", engine.step, self.stats), engine.manifest
        if self.unmasking is not None:
            return decode_blocks(step, self.cache, self.ids, m.max_new, m.model.diffusion.contract,
                                 self.unmasking, self.stop, self.stats)
        return decode(step, self.cache, self.ids, m.max_new, self.drafter, self.sampling,
                      self.stop, self.rng, self.stats, self.healing)


def load_program(backend: Backend, path: Path, outputs: tuple[str, ...],
                 device: Device = Device.CPU) -> StepFunction:
    """One lowered program of ``backend``, callable on numpy arrays in signature order."""
    return BACKENDS[backend].load(path, outputs, device)


class Engine:
    """A loaded engine. Its ``full`` program is loaded with it, and the programs of the
    policies named at `load`; any other policy's programs load on its first use."""

    def __init__(self, path: Path, manifest: Manifest, tokenizer: Tokenizer,
                 device: Device = Device.CPU):
        self.path = path
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.device = device
        self._programs: dict[str, StepFunction] = {}
        self.step = self.program("full")

    @classmethod
    def load(cls, path: str | Path, device: str | Device = Device.CPU,
             policies: Iterable[str | Policy] = ()) -> Engine:
        """Validate the directory fully, then load the tokenizer, the ``full`` program and
        the programs ``policies`` run (each must be one the engine supports)."""
        path = Path(path)
        manifest = read_manifest(path)
        device = parse_choice(Device, device, "device")
        BACKENDS[manifest.backend].check_device(device)
        try:
            tokenizer = Tokenizer.from_file(str(path / manifest.tokenizer.file))
        except Exception as err:  # tokenizers raises plain Exceptions for bad JSON
            raise EngineError(f"{path}: tokenizer file is corrupt ({err})") from None
        # Not in tokenizer.json (`Tokenizer.save` drops it): the build's setting, so a
        # prompt encodes here as it did when the engine was built and measured.
        tokenizer.encode_special_tokens = manifest.tokenizer.encode_special_tokens
        engine = cls(path, manifest, tokenizer, device)
        for policy in policies:
            for name in required_programs(manifest, engine.policy(policy)):
                engine.program(name)
        return engine

    def program(self, name: str) -> StepFunction:
        """The engine's program ``name``, loaded on first use."""
        if name not in self._programs:
            self._programs[name] = self._load_program(name)
        return self._programs[name]

    @property
    def loaded_programs(self) -> tuple[str, ...]:
        """The programs loaded so far, in load order."""
        return tuple(self._programs)

    def _load_program(self, name: str) -> StepFunction:
        entry = self.manifest.programs[name]
        try:
            return load_program(self.manifest.backend, self.path / entry.file,
                                entry.output_names, self.device)
        except LeapcUserError:  # a setting of the user's (LEAPC_THREADS), already one line
            raise
        except Exception as err:  # a corrupt ONNX/pt2 file surfaces as a runtime error
            raise EngineError(f"{self.path}: program {name!r} cannot be loaded ({err})") from None

    @cached_property
    def datastore(self) -> Datastore | None:
        """The retrieval policy's corpus, if the engine has one; read on first use, so
        loading an engine for other policies does not read it (tens of MB)."""
        store = self.manifest.datastore
        return Datastore.load(self.path / store.directory, store.depth) if store else None

    # ------------------------------------------------------------------ requests

    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = (list(prompt) if isinstance(prompt, list)
               else self.tokenizer.encode(require_utf8(prompt, "the prompt")).ids)
        bos = self.manifest.tokenizer.bos_id
        if not ids:
            if bos is None:
                raise InputError("empty prompt and the model has no BOS token to start from")
            ids = [bos]
        vocab = self.manifest.model.dims.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.manifest.max_seq:
            raise InputError(f"prompt has {len(ids)} tokens; this engine's max-seq is "
                             f"{self.manifest.max_seq} (at least one must be left to generate)")
        return ids

    def policy(self, policy: str | Policy) -> Policy:
        """``policy`` as a `Policy`, refused unless this engine supports it; ``auto`` is the
        tuned choice, or on an engine built without ``--tune`` its reference policy (`ar`,
        or `mdm` for a block-diffusion model)."""
        if policy == AUTO_POLICY:
            tuning = self.manifest.tuning
            return tuning.chosen.policy if tuning is not None else self.manifest.policies[0]
        chosen = parse_choice(Policy, policy, "policy")
        if chosen not in self.manifest.policies:
            supported = ", ".join(p.value for p in self.manifest.policies)
            raise InputError(f"engine does not support policy {chosen.value!r} ({supported})")
        return chosen

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        policy: str | Policy = Policy.AR,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        draft: DraftOptions = DraftOptions(),
        typical: TypicalAcceptance | None = None,
        token_healing: bool = False,
        diffusion: DiffusionOptions = DiffusionOptions(),
    ) -> Stream:
        """``typical`` opts into Medusa's typical acceptance (rule 6) when sampling: more
        tokens per step, but the output no longer follows the model's distribution.
        ``token_healing`` backs a text prompt up by its last token and starts the
        completion with a token that begins with its text (runtime/healing.py; the CLI's
        and the server's default) under autoregressive policies; a prompt of token ids is
        taken as it is. ``diffusion``: the block-diffusion policies' knobs."""
        run = self._setup(prompt, max_new_tokens, policy, temperature, top_k, top_p, seed,
                          draft, typical, token_healing, diffusion)
        return Stream(run.loop(self), self.tokenizer, run.stats, run.healing)

    def sequence(self, prompt: str | list[int], max_new_tokens: int = 64,
                 policy: str | Policy = Policy.AR, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, draft: DraftOptions = DraftOptions(),
                 typical: TypicalAcceptance | None = None, token_healing: bool = False,
                 diffusion: DiffusionOptions = DiffusionOptions()) -> Sequence:
        """The same generation as `stream`, as a request for a `Scheduler` (`scheduler`):
        a row of its batch, or a run of its own for a policy that does not batch."""
        run = self._setup(prompt, max_new_tokens, policy, temperature, top_k, top_p, seed,
                          draft, typical, token_healing, diffusion)
        batches = POLICIES[run.policy].batches
        return Sequence(run.ids, run.drafter, run.sampling, run.stop, run.rng, run.stats,
                        run.cache, run.healing, batches, None if batches else run.loop(self))

    def scheduler(self, max_batch: int, step_nodes: int | None = None,
                  prefix_cache_bytes: int = 0) -> Scheduler:
        """A continuous-batching scheduler over this engine's ``full`` program, running up
        to ``max_batch`` requests per step (at most the program's batch bound); with
        ``step_nodes``, a decode step verifies at most that many nodes over its rows; with
        ``prefix_cache_bytes``, requests reuse earlier prompts' KV (runtime/prefix_cache.py),
        which only engines that verify exactly allow."""
        if not 1 <= max_batch <= self.batch_bound:
            raise InputError(f"max-batch must be in [1, {self.batch_bound}], this engine's "
                             f"batch bound (got {max_batch}; `leapc build --max-batch` "
                             "raises it)")
        entry = self.manifest.programs["full"]
        slicing = RowSlicing.of({name: entry.output_shape(name) for name in entry.output_names})
        if step_nodes is not None and step_nodes < 1:
            raise InputError(f"step-nodes must be at least 1 (got {step_nodes})")
        if prefix_cache_bytes and self.prefix_cache_refusal:
            raise InputError(self.prefix_cache_refusal)
        prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        return Scheduler(self.step, slicing, self.manifest.model.dims, self.manifest.max_seq,
                         self.manifest.max_new, max_batch, step_nodes, prefixes)

    @property
    def prefix_cache_refusal(self) -> str | None:
        """Why this engine cannot reuse prompt KV across requests, or None: reused rows
        were computed in steps of other widths, which is exact only where verification is."""
        inexact = self.manifest.inexact_verification
        return inexact and ("a prefix cache reuses KV rows computed in steps of other "
                            f"widths, so this engine {inexact}")

    @property
    def batch_bound(self) -> int:
        """The most rows a step of the ``full`` program takes (`leapc build --max-batch`)."""
        return self.manifest.programs["full"].signature["bounds"]["B"][1]

    def _setup(self, prompt: str | list[int], max_new_tokens: int, policy: str | Policy,
               temperature: float, top_k: int, top_p: float, seed: int, draft: DraftOptions,
               typical: TypicalAcceptance | None, token_healing: bool,
               diffusion: DiffusionOptions) -> _Run:
        chosen, ids = self.check_request(prompt, max_new_tokens, policy, temperature, top_k,
                                         top_p, seed, draft, diffusion)
        unmasking = POLICIES[chosen].unmasking
        if unmasking is not None and typical is not None:
            raise InputError(f"{chosen.value} is a block-diffusion policy: typical acceptance "
                             "is for autoregressive policies")
        # A text prompt's end is where the user stopped typing; token ids are as meant. A
        # block-diffusion policy unmasks whole blocks: healing is the next token's.
        healed = token_healing and isinstance(prompt, str) and unmasking is None
        ids, healing = heal(ids, self.token_texts) if healed else (ids, None)
        if policy == AUTO_POLICY:
            draft = self.tuned_options(draft)
        sampling = SamplingConfig(temperature, top_k, top_p, typical)
        stats = GenerationStats(policy=chosen.value)
        cache = self.new_cache(chosen)
        rule = None if unmasking is None else unmasking(
            Chooser(self.manifest.model.diffusion.contract, sampling, seed), diffusion)
        return _Run(chosen, ids, sampling, stats, cache,
                    self.drafter(chosen, cache, draft, sampling, seed, stats),
                    StopConfig(max_new_tokens, self.manifest.tokenizer.eos_ids),
                    np.random.default_rng(seed), healing, rule)

    @cached_property
    def token_texts(self) -> TokenTexts:
        """Every token's text, for token healing (built on first use)."""
        return TokenTexts(self.tokenizer, self.manifest.model.dims.vocab_size)

    def check_request(self, prompt: str | list[int], max_new_tokens: int = 64,
                      policy: str | Policy = Policy.AR, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                      draft: DraftOptions = DraftOptions(),
                      diffusion: DiffusionOptions = DiffusionOptions()) -> tuple[Policy, list[int]]:
        """What `stream` refuses, refused without loading or running anything: the policy,
        the options and the prompt (an `InputError`); the policy and the prompt's ids.
        A server answers a bad request with this at once, not after the queue."""
        chosen = self.policy(policy)
        _check_options(max_new_tokens, temperature, top_k, top_p, seed)
        draft.tree_shape()  # every policy's knobs are checked, used or not
        diffusion.check()
        return chosen, self.encode(prompt)

    def tuned_options(self, draft: DraftOptions) -> DraftOptions:
        """``draft`` with the tuned draft length, unless it sets one."""
        tuning = self.manifest.tuning
        if tuning is None or draft.max_draft is not None:
            return draft
        return replace(draft, max_draft=tuning.chosen.max_draft)

    def new_cache(self, policy: str | Policy = Policy.AR) -> KVCache:
        """An empty target KV cache for ``policy`` (with its extra layers, if any)."""
        extra = POLICIES[self.policy(policy)].extra_layers
        return new_cache(self.manifest.model.dims, self.manifest.max_seq, extra)

    def drafter(self, policy: str | Policy, cache: KVCache, options: DraftOptions = DraftOptions(),
                sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                stats: GenerationStats | None = None) -> Drafter:
        """``policy``'s drafter for one generation into ``cache`` (the target's: early exit
        and layer skip draft inside it); its program calls are timed into ``stats``."""
        chosen = self.policy(policy)
        options.tree_shape()  # every policy's knobs are checked, used or not

        def program(name: str) -> StepFunction:
            found = self.program(name)
            return TimedProgram(name, found, stats) if stats is not None else found

        context = DraftContext(self.manifest, program, cache, sampling, seed, options,
                               lambda: self.datastore)
        return POLICIES[chosen].drafter(context)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, **options) -> Generation:
        stream = self.stream(prompt, max_new_tokens, **options)
        for _ in stream:
            pass
        return Generation(stream.token_ids, stream.text, stream.stats)


# The smallest sampling temperature: any float32 logit divided by it is a finite float64
# (sampling computes logits / T in float64; an infinite z turns the softmax into NaNs).
MIN_TEMPERATURE = float(np.finfo(np.float32).max) / float(np.finfo(np.float64).max)


def _check_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   seed: int) -> None:
    if max_new_tokens < 1:
        raise InputError(f"max-new-tokens must be at least 1 (got {max_new_tokens})")
    # NaN fails every comparison, so each check is written to fail on it too
    if not (temperature == 0.0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise InputError(f"temperature must be 0 (greedy) or a finite number >= "
                         f"{MIN_TEMPERATURE:.1e} (got {temperature})")
    if top_k < 0:
        raise InputError(f"top-k must be >= 0 (got {top_k})")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top-p must be in (0, 1] (got {top_p})")
    if seed < 0:  # numpy's generators take non-negative seeds only
        raise InputError(f"seed must be >= 0 (got {seed})")
