"""The decode loop: prefill in chunks, then draft → verify → accept → commit → emit.

Autoregressive decoding is the loop with an empty draft: each step verifies one token
(the last emitted one) and the acceptance rule samples the next from its logits.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from leapc.runtime.acceptance import accept
from leapc.runtime.drafters.base import (
    Draft,
    Drafter,
    ReadsPrefill,
    Verification,
    VerifiesDraft,
)
from leapc.runtime.healing import Healing
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.sampling import SamplingConfig, sample
from leapc.runtime.step import StepFunction


class StopReason(str, enum.Enum):
    """Why generation ended."""

    EOS = "eos"  # the model emitted an end-of-sequence token
    MAX_NEW_TOKENS = "max_new_tokens"  # the request's token budget is spent
    MAX_SEQ = "max_seq"  # prompt + output fill the engine's max_seq


@dataclass
class GenerationStats:
    policy: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # target forward calls that emitted tokens (the last prefill call is one)
    prefill_calls: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from a prefix cache
    prefill_s: float = 0.0
    decode_s: float = 0.0
    emitted_per_step: list[int] = field(default_factory=list)  # tokens each call emitted
    drafted_depth: list[int] = field(default_factory=list)  # per verify: deepest draft
    accepted_depth: list[int] = field(default_factory=list)  # per verify: drafts accepted
    stop_reason: StopReason | None = None  # set when generation ends
    program_s: float = 0.0  # inside program calls (`TimedProgram`): the engine's time
    calls: collections.Counter[str] = field(default_factory=collections.Counter)  # by program

    @property
    def tau(self) -> float:
        """Mean tokens emitted per target forward (bonus token included)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        """End to end: new tokens over prefill plus decode time."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    @property
    def overhead_share(self) -> float:
        """leapc's own share of the generation's time: drafting, building inputs,
        acceptance, commit, Python; everything outside program calls."""
        total = self.prefill_s + self.decode_s
        return max(0.0, 1.0 - self.program_s / total) if total > 0 else 0.0

    @property
    def calls_per_token(self) -> float:
        """Program calls (prefill, drafting and verifying alike) per new token."""
        return sum(self.calls.values()) / self.new_tokens if self.new_tokens else 0.0

    def per_depth_acceptance(self) -> list[float]:
        """At depth d: P(the d-th drafted token is accepted | a draft reached depth d)."""
        drafted = np.asarray(self.drafted_depth)
        accepted = np.asarray(self.accepted_depth)
        return [float((accepted[drafted >= d] >= d).mean())
                for d in range(1, int(drafted.max(initial=0)) + 1)]

    def as_dict(self) -> dict:
        return {
            "policy": self.policy, "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens, "steps": self.steps, "tau": self.tau,
            "tokens_per_s": self.tokens_per_s, "prefill_s": self.prefill_s,
            "decode_s": self.decode_s, "prefill_calls": self.prefill_calls,
            "overhead_share": self.overhead_share, "calls_per_token": self.calls_per_token,
            "calls": dict(self.calls),
            "stop_reason": self.stop_reason.value if self.stop_reason is not None else None,
        }


class TimedProgram:
    """``program`` adding each call's wall time and count to ``stats``: what the decode
    stats' overhead share and calls per token are measured from."""

    def __init__(self, name: str, program: StepFunction, stats: GenerationStats):
        self.name, self.program, self.stats = name, program, stats
        self.output_names = program.output_names

    def __call__(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.program(*inputs)
        self.stats.program_s += time.perf_counter() - start
        self.stats.calls[self.name] += 1
        return out


@dataclass(frozen=True)
class StopConfig:
    max_new_tokens: int
    eos_ids: tuple[int, ...]


def prefill(step: StepFunction, cache: KVCache, prompt: list[int],
            chunk: int) -> dict[str, np.ndarray]:
    """Run the prompt through in chunks of at most ``chunk``; return the last call's outputs
    (its last ``logits`` row predicts the first new token)."""
    for start in range(0, len(prompt), chunk):
        piece = prompt[start : start + chunk]
        out = step(*tree_inputs(cache, Draft.chain_of(piece[0], piece[1:])))
        cache.commit(out["present"], np.arange(len(piece)))
    return out


def tree_inputs(cache: KVCache, draft: Draft):
    """Step inputs verifying a draft: positions = cache length + each node's offset from
    the root (its depth, for tree nodes); mask = the valid past, then the node mask (the
    ancestor mask for a plain tree)."""
    tokens, offsets, nodes_mask = draft.step_nodes()
    n = len(tokens)
    past = cache.past_for(n)
    slots = past.shape[4]
    mask = np.zeros((1, n, slots + n), dtype=bool)
    mask[0, :, : cache.length] = True
    mask[0, :, slots:] = nodes_mask
    return tokens[None], (cache.length + offsets)[None], past, mask


def refeed_inputs(context: list[int], start: int, end: int,
                  slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens, positions and mask that feed committed tokens ``start..end`` again (a
    draft's adapter rows, a window being scored): they attend to the past's slots before
    ``start`` only (of ``slots``) and causally to each other."""
    n = end - start
    mask = np.concatenate([np.broadcast_to(np.arange(slots) < start, (n, slots)),
                           np.tri(n, dtype=bool)], axis=1)
    return np.asarray([context[start:end]], dtype=np.int64), np.arange(start, end)[None], mask[None]


def _split_logits(logits: np.ndarray, draft: Draft) -> tuple[np.ndarray, np.ndarray | None]:
    """The tree's rows (all that acceptance sees) and the extra nodes' rows, if any."""
    tree = draft.tree.size
    return logits[:tree], (logits[tree:] if draft.extra is not None else None)


def _truncate(tokens: list[int], stop: StopConfig, emitted: int,
              room: int) -> tuple[list[int], StopReason | None]:
    """Cut after the first EOS, at the token budget, or where the output reaches ``room``
    tokens (prompt + output = max_seq); say why generation ends there, if it does. A token
    that is both the last of the budget and of max_seq ends the request's budget: the
    caller got every token it asked for."""
    for i, t in enumerate(tokens):
        count = emitted + i + 1
        if t in stop.eos_ids:
            reason = StopReason.EOS
        elif count >= stop.max_new_tokens:
            reason = StopReason.MAX_NEW_TOKENS
        elif count >= room:
            reason = StopReason.MAX_SEQ
        else:
            continue
        return tokens[: i + 1], reason
    return tokens, None


def draft_budget(length: int, max_seq: int, chunk: int, stop: StopConfig, emitted: int) -> int:
    """Nodes a drafter may add to the root this step, after a past of ``length`` slots.

    A step runs at most ``chunk`` nodes (the programs' N bound). Verifying a draft commits
    the root and k accepted nodes at slots ``length .. length + k`` and emits k + 1 tokens,
    the last (the bonus) at position ``length + k + 1``: neither the token budget nor
    max_seq (prompt + output) may be passed, so k <= max_seq - length - 2. That also leaves
    the step (``T + N <= max_seq``) and one more slot after the deepest node (an early
    exit's closing call) inside the cache.
    """
    return min(chunk - 1, stop.max_new_tokens - emitted - 1, max_seq - length - 2)


class Progress:
    """One generation after its prefill: draft, then conclude the verify step, emitting.

    The single-request loop (`decode`) and the batch scheduler (runtime/batching.py) both
    drive it, so a request's drafts, acceptance draws and stops are the same code however
    it is scheduled.
    """

    def __init__(self, prompt: list[int], last_prefill: dict[str, np.ndarray],
                 drafter: Drafter, sampling: SamplingConfig, stop: StopConfig,
                 rng: np.random.Generator, stats: GenerationStats, max_seq: int,
                 healing: Healing | None = None):
        self.drafter, self.sampling, self.stop, self.rng, self.stats = (
            drafter, sampling, stop, rng, stats)
        if isinstance(drafter, ReadsPrefill):
            drafter.observe_prefill(last_prefill)
        self.room = max_seq - len(prompt)  # new tokens the context holds
        self.context = list(prompt)
        logits = last_prefill["logits"][0, -1]
        # Healing constrains this first token only, before any draft: every policy agrees.
        self.root = sample(logits if healing is None else healing.constrain(logits), sampling,
                           rng)
        # The tokens the last call emitted, and why generation ends with them, if it does.
        self.new, stats.stop_reason = _truncate([self.root], stop, 0, self.room)
        self.record()

    @property
    def done(self) -> bool:
        return self.stats.stop_reason is not None

    def record(self) -> None:
        """Count the call that produced ``new`` (the last prefill call at first)."""
        self.stats.steps += 1
        self.stats.new_tokens += len(self.new)
        self.stats.emitted_per_step.append(len(self.new))

    def draft(self, budget: int) -> Draft:
        draft = self.drafter.propose(self.context, self.root, budget)
        _check_budget(self.drafter, draft, budget)
        return draft

    def conclude(self, draft: Draft, out: dict[str, np.ndarray],
                 commit: Callable[[np.ndarray, list[int]], None]) -> list[int]:
        """Accept from the verify step's outputs ``out`` (batch axis of size one), commit
        the accepted rows of ``present`` through ``commit``; the tokens emitted."""
        logits, extra_logits = _split_logits(out["logits"][0], draft)
        path, emitted = accept(draft, logits, self.sampling, self.rng)
        commit(out["present"], path)  # path indices are tree nodes: extra rows never land
        stats = self.stats
        stats.drafted_depth.append(int(draft.tree.depth.max()))
        stats.accepted_depth.append(len(path) - 1)
        self.context.extend(draft.tokens[path].tolist())
        others = {k: v for k, v in out.items() if k not in ("logits", "present")}
        self.drafter.observe(self.context,
                             Verification(draft, logits, path, emitted, extra_logits, others))
        self.root = emitted[-1]
        self.new, stats.stop_reason = _truncate(emitted, self.stop, stats.new_tokens, self.room)
        self.record()
        return self.new


def decode(
    step: StepFunction,
    cache: KVCache,
    prompt: list[int],
    chunk: int,
    drafter: Drafter,
    sampling: SamplingConfig,
    stop: StopConfig,
    rng: np.random.Generator,
    stats: GenerationStats,
    healing: Healing | None = None,
) -> Iterator[list[int]]:
    """Yield the tokens each step emits until EOS, the token budget, or prompt + output
    fill max_seq (every output token has a position below max_seq); ``stats.stop_reason``
    says which. Drafts shrink to fit what is left (`draft_budget`), so the end of the
    context never fails a step. With ``healing``, ``prompt`` is already backed up
    (runtime/healing.py) and the first token is constrained.

    The root of every draft is the last emitted token, not yet in the cache: verifying it
    together with the drafts writes its KV row and yields the logits that check depth 1.
    """
    out = timed_prefill(step, cache, prompt, chunk, stats)
    start = time.perf_counter()
    progress = Progress(prompt, out, drafter, sampling, stop, rng, stats, cache.max_seq,
                        healing)
    verifies = isinstance(drafter, VerifiesDraft)  # a Protocol check: ~40 µs, once
    while True:
        stats.decode_s += time.perf_counter() - start
        yield progress.new  # consumer time is not decode time
        if progress.done:
            return
        start = time.perf_counter()
        draft = progress.draft(draft_budget(cache.length, cache.max_seq, chunk, stop,
                                            stats.new_tokens))
        out = drafter.verify(cache, draft) if verifies else step(*tree_inputs(cache, draft))
        progress.conclude(draft, out, cache.commit)


def timed_prefill(step: StepFunction, cache: KVCache, prompt: list[int], chunk: int,
                  stats: GenerationStats) -> dict[str, np.ndarray]:
    """`prefill` of a checked prompt, counted and timed into ``stats``."""
    check_prompt(prompt, cache.max_seq)
    start = time.perf_counter()
    out = prefill(step, cache, prompt, chunk)
    stats.prompt_tokens, stats.prefill_calls = len(prompt), -(-len(prompt) // chunk)
    stats.prefill_s = time.perf_counter() - start
    return out


def check_prompt(prompt: list[int], max_seq: int) -> None:
    if not 0 < len(prompt) < max_seq:
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves nothing to generate within "
                         f"max_seq {max_seq}")


def _check_budget(drafter: Drafter, draft: Draft, budget: int) -> None:
    """A draft over its budget is a drafter bug: name it, before the step fails obscurely
    on the cache's or the program's bounds."""
    if draft.step_size > budget + 1:
        raise RuntimeError(f"{type(drafter).__name__} drafted {draft.step_size - 1} nodes; "
                           f"the step's budget was {budget}")
