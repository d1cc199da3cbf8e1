"""A loaded engine: manifest + step program + tokenizer + the decode loop.

Importing this module (and running an ORT engine) needs numpy, onnxruntime, tokenizers
and pydantic only; the eager and aoti backends import torch when, and only when, they are
loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from leapc.runtime.backends.base import BACKENDS, Device, StepFunction
from leapc.runtime.datastore import Datastore
from leapc.runtime.decode import GenerationStats, StopConfig, decode
from leapc.runtime.detokenize import Detokenizer
from leapc.runtime.drafters.base import ChildSampling, Drafter, NoDrafter
from leapc.runtime.drafters.cache_chain import LayerSkipDrafter
from leapc.runtime.drafters.draft_model import DraftModelDrafter, TreeShape
from leapc.runtime.drafters.early_exit import EarlyExitDrafter, KangarooDrafter
from leapc.runtime.drafters.heads import DynamicTree, HeadsDrafter
from leapc.runtime.drafters.lookahead import LookaheadConfig, LookaheadDrafter
from leapc.runtime.drafters.lookup import LookupDrafter
from leapc.runtime.drafters.recycle import RecycleDrafter
from leapc.runtime.drafters.retrieval import RetrievalConfig, RetrievalDrafter
from leapc.runtime.drafters.swift import SwiftDrafter
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.manifest import Backend, Manifest, ModelInfo, Policy, read_manifest
from leapc.runtime.sampling import SamplingConfig, TypicalAcceptance


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # new tokens only
    text: str
    stats: GenerationStats


@dataclass(frozen=True)
class StreamChunk:
    token_ids: list[int]  # the last chunk, holding the flushed tail, may have none
    text: str  # the text that became final with these tokens (runtime/detokenize.py)


DEFAULT_MAX_DRAFT = 8


@dataclass(frozen=True)
class DraftOptions:
    """Per-policy drafting knobs (ignored by policies that do not use them)."""

    # Longest chain a drafter proposes per step; None: the policy's default (the engine's
    # measured best for early exit, else DEFAULT_MAX_DRAFT).
    max_draft: int | None = None
    ngram: int = 4  # prompt lookup: longest suffix n-gram matched
    adaptive: bool = False  # chain drafters: +2 / -1 draft length instead of max_draft
    matches: int = 1  # lookup: continuations of that many earlier occurrences, as a tree
    branching: tuple[int, ...] = ()  # draft model: children per node at depths 1, 2, ...
    confidence: float = 0.0  # draft model: expand only nodes with top-1 probability >= this
    children: ChildSampling = ChildSampling.WITHOUT_REPLACEMENT  # sampled trees: rule 4 or 3

    lookahead: LookaheadConfig = LookaheadConfig()  # window W, n-gram N, guesses G
    retrieval: RetrievalConfig = RetrievalConfig()  # datastore tree: nodes, n-gram, backoff
    dynamic: DynamicTree = DynamicTree()  # *-dynamic head policies: nodes kept, beam
    head_tree: tuple[tuple[int, ...], ...] = ()  # medusa / hydra: rank paths (() = the engine's)

    def draft_length(self, default: int = DEFAULT_MAX_DRAFT) -> int:
        return default if self.max_draft is None else self.max_draft

    def tree_shape(self) -> TreeShape:
        if self.draft_length() < 0 or self.ngram < 1 or self.matches < 1:
            raise InputError("max-draft must be >= 0, ngram and matches >= 1")
        if any(width < 1 for width in self.branching):
            raise InputError(f"draft-tree widths must be >= 1 (got {self.branching})")
        if not 0.0 <= self.confidence < 1.0:
            raise InputError(f"confidence must be in [0, 1) (got {self.confidence})")
        return TreeShape(self.draft_length(), self.branching, self.confidence, self.children)


@dataclass
class Stream:
    """Iterate for `StreamChunk`s; ``token_ids`` and ``stats`` fill in as it runs."""

    _tokens: Iterator[list[int]]
    _tokenizer: Tokenizer
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[StreamChunk]:
        """The chunks' texts join to `text`: each is final when yielded (never part of a
        character), and what generation ends on is flushed in a last, token-less chunk."""
        detokenizer = Detokenizer(self._tokenizer)
        for new in self._tokens:
            self.token_ids.extend(new)
            yield StreamChunk(new, detokenizer.push(new))
        tail = detokenizer.flush()
        if tail:
            yield StreamChunk([], tail)

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self.token_ids, skip_special_tokens=True)


def _check_device(manifest: Manifest, device: Device) -> None:
    BACKENDS[manifest.backend].check_device(device)


def _load_step(engine_dir: Path, manifest: Manifest, program: str,
               device: Device) -> StepFunction:
    entry = manifest.programs[program]
    outputs = tuple(o["name"] for o in entry.signature["outputs"])
    return load_program(manifest.backend, engine_dir / entry.file, outputs, device)


def load_program(backend: Backend, path: Path, outputs: tuple[str, ...],
                 device: Device = Device.CPU) -> StepFunction:
    """One lowered program of ``backend``, callable on numpy arrays in signature order."""
    return BACKENDS[backend].load(path, outputs, device)


class Engine:
    def __init__(self, path: Path, manifest: Manifest, steps: dict[str, StepFunction],
                 tokenizer: Tokenizer):
        self.path = path
        self.manifest = manifest
        self.steps = steps  # by program name: "full", "draft_model", ...
        self.step = steps["full"]
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str | Path, device: str | Device = Device.CPU) -> Engine:
        """Validate the directory fully, then load the program and tokenizer."""
        path = Path(path)
        manifest = read_manifest(path)
        device = parse_choice(Device, device, "device")
        _check_device(manifest, device)
        try:
            tokenizer = Tokenizer.from_file(str(path / manifest.tokenizer.file))
        except Exception as err:  # tokenizers raises plain Exceptions for bad JSON
            raise EngineError(f"{path}: tokenizer file is corrupt ({err})") from None
        # Not in tokenizer.json (`Tokenizer.save` drops it): the build's setting, so a
        # prompt encodes here as it did when the engine was built and measured.
        tokenizer.encode_special_tokens = manifest.tokenizer.encode_special_tokens
        steps = {}
        for name in manifest.programs:
            try:
                steps[name] = _load_step(path, manifest, name, device)
            except LeapcUserError:  # a setting of the user's (LEAPC_THREADS), already one line
                raise
            except Exception as err:  # a corrupt ONNX/pt2 file surfaces as a runtime error
                raise EngineError(f"{path}: program {name!r} cannot be loaded ({err})") from None
        return cls(path, manifest, steps, tokenizer)

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
        vocab = self.manifest.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.manifest.max_seq:
            raise InputError(f"prompt has {len(ids)} tokens; this engine's max-seq is "
                             f"{self.manifest.max_seq} (at least one must be left to generate)")
        return ids

    def _policy(self, policy: str | Policy) -> Policy:
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
    ) -> Stream:
        """``typical`` opts into Medusa's typical acceptance (rule 6) when sampling: more
        tokens per step, but the output no longer follows the model's distribution."""
        chosen = self._policy(policy)
        _check_options(max_new_tokens, temperature, top_k, top_p, seed)
        ids = self.encode(prompt)
        sampling = SamplingConfig(temperature, top_k, top_p, typical)
        stats = GenerationStats(policy=chosen.value)
        # Kangaroo's adapter keeps its KV rows in an extra layer of the target's cache.
        cache = self._cache(self.manifest.model, extra_layers=int(chosen is Policy.KANGAROO))
        tokens = decode(
            self.step, cache, ids, self.manifest.max_new,
            self._drafter(chosen, draft, sampling, seed, cache), sampling,
            StopConfig(max_new_tokens, self.manifest.tokenizer.eos_ids),
            np.random.default_rng(seed), stats,
        )
        return Stream(tokens, self.tokenizer, stats)

    def _cache(self, model: ModelInfo, extra_layers: int = 0) -> KVCache:
        return KVCache(model.num_layers, model.num_kv_heads, model.head_dim, model.dtype,
                       self.manifest.max_seq, extra_layers=extra_layers)

    def _drafter(self, policy: Policy, options: DraftOptions, sampling: SamplingConfig,
                 seed: int, cache: KVCache) -> Drafter:
        """The policy's drafter; ``cache`` is the target's (early exit drafts inside it)."""
        shape = options.tree_shape()
        if policy is Policy.LOOKUP:
            return LookupDrafter(max_ngram=options.ngram, max_draft=options.draft_length(),
                                 adaptive=options.adaptive, matches=options.matches)
        if policy is Policy.RECYCLE:
            return RecycleDrafter(self.manifest.model.vocab_size)
        if policy is Policy.LOOKAHEAD:
            return self._lookahead(options.lookahead, seed)
        if policy is Policy.RETRIEVAL:
            return RetrievalDrafter(self.datastore, options.retrieval, max_draft=options.draft_length(),
                                    max_ngram=options.ngram)
        if policy in _HEAD_POLICIES:
            return self._heads(policy, options)
        if policy in _EXIT_POLICIES:
            return self._early_exit(policy, options, sampling, seed, cache)
        if policy in (Policy.LAYER_SKIP, Policy.SWIFT):
            return self._layer_skip(policy, options, sampling, seed, cache)
        if policy is Policy.DRAFT:
            return DraftModelDrafter(
                self.steps["draft_model"], self._cache(self.manifest.draft_model),
                self.manifest.max_new, sampling, np.random.default_rng([seed, 1]),
                shape, adaptive=options.adaptive)
        return NoDrafter()

    def _early_exit(self, policy: Policy, options: DraftOptions, sampling: SamplingConfig,
                    seed: int, cache: KVCache) -> EarlyExitDrafter | KangarooDrafter:
        """The model's own first E layers and exit draft a chain in the target's cache; the
        remainder verifies it. Kangaroo drafts through its adapter and stops the chain at
        the first token whose top-1 probability is below the confidence (its double exit)."""
        options.tree_shape()  # validates the knobs
        rng, exit_layer = np.random.default_rng([seed, 1]), self.manifest.exit_layer
        if policy is Policy.KANGAROO:
            adapter = self.manifest.adapter  # its defaults: the fastest measured at build
            return KangarooDrafter(self.steps["kangaroo"], cache, exit_layer, sampling, rng,
                                   options.draft_length(adapter.depth),
                                   options.confidence or adapter.confidence, options.adaptive,
                                   remainder=self.steps["remainder"], chunk=self.manifest.max_new)
        return EarlyExitDrafter(self.steps["draft"], cache, exit_layer, sampling, rng,
                                options.draft_length(self._exit_depth()), options.confidence,
                                options.adaptive, remainder=self.steps["remainder"])

    def _layer_skip(self, policy: Policy, options: DraftOptions, sampling: SamplingConfig,
                    seed: int, cache: KVCache) -> LayerSkipDrafter | SwiftDrafter:
        """``layer-skip`` drafts with the engine's skip set; ``swift`` with the set that
        scores best on the recent window (the engine's at first), stopping chains below a
        confidence."""
        choice = self.manifest.skip_choice
        chosen = choice.candidates.index(self.manifest.skip)
        confidence = options.confidence
        if policy is Policy.SWIFT:
            confidence = confidence or SWIFT_CONFIDENCE
        indices = range(len(choice.candidates)) if policy is Policy.SWIFT else [chosen]
        drafters = [LayerSkipDrafter(self.steps[f"skip_{i}"], cache,
                                     self.manifest.model.num_layers, sampling,
                                     np.random.default_rng([seed, 1, i]),
                                     options.draft_length(choice.depth), confidence,
                                     options.adaptive)
                    for i in indices]
        if policy is Policy.SWIFT:
            return SwiftDrafter(drafters, self.step, current=chosen, chunk=self.manifest.max_new)
        return drafters[0]

    def _exit_depth(self) -> int:
        """Early exit's chain length: the one `--exit-layer auto` measured fastest."""
        choice = self.manifest.exit_choice
        return choice.depth if choice is not None else DEFAULT_EXIT_DEPTH

    def _heads(self, policy: Policy, options: DraftOptions) -> HeadsDrafter:
        dynamic, heads = options.dynamic, self.manifest.heads
        if dynamic.total < 1 or dynamic.beam < 1:
            raise InputError(f"dynamic tree needs nodes and beam >= 1 (got {dynamic})")
        tree = options.head_tree or heads.tree
        if max(map(len, tree), default=0) > heads.num_heads:
            raise InputError(f"a head tree of depth {max(map(len, tree))} needs more than "
                             f"this engine's {heads.num_heads} heads")
        return HeadsDrafter(heads.kind, heads.num_heads, heads.placement, self.steps.get("heads"),
                            tree, dynamic if policy in _DYNAMIC else None)

    def _lookahead(self, config: LookaheadConfig, seed: int) -> LookaheadDrafter:
        if config.smallest_step > self.manifest.max_new:
            raise InputError(f"lookahead {config} needs steps of {config.smallest_step} tokens "
                             "(window and one n-gram); this engine's steps take at most "
                             f"{self.manifest.max_new}")
        return LookaheadDrafter(config, np.random.default_rng([seed, 2]))

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, **options) -> Generation:
        stream = self.stream(prompt, max_new_tokens, **options)
        for _ in stream:
            pass
        return Generation(stream.token_ids, stream.text, stream.stats)


_HEAD_POLICIES = (Policy.MEDUSA, Policy.MEDUSA_DYNAMIC, Policy.HYDRA, Policy.HYDRA_DYNAMIC)
_DYNAMIC = (Policy.MEDUSA_DYNAMIC, Policy.HYDRA_DYNAMIC)
_EXIT_POLICIES = (Policy.EARLY_EXIT, Policy.KANGAROO)
# Early exit's chain length when the engine measured none (`--exit-layer E` without a sweep
# records this one): the bundled model's best at E = 4 (docs/decisions.md).
DEFAULT_EXIT_DEPTH = 3
# Layer skip's chain length when the engine measured none (bench/bench_self_spec.py).
DEFAULT_SKIP_DEPTH = 3
# swift's default stop: a chain stops below this draft top-1 probability (0.5 stopped the
# bundled model's skip chains at tau 1.4; bench/results/self_spec_bundled.md).
SWIFT_CONFIDENCE = 0.1


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
