"""The decode loop: prefill in chunks, then draft → verify → accept → commit → emit.

Autoregressive decoding is the loop with an empty draft: each step verifies one token
(the last emitted one) and the acceptance rule samples the next from its logits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from leapc.runtime.backends.base import StepFunction
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.sampling import SamplingConfig, sample


@dataclass
class GenerationStats:
    policy: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # target forward calls that emitted tokens (the last prefill call is one)
    prefill_calls: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per target forward (bonus token included)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        """End to end: new tokens over prefill plus decode time."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "policy": self.policy, "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens, "steps": self.steps, "tau": self.tau,
            "tokens_per_s": self.tokens_per_s, "prefill_s": self.prefill_s,
            "decode_s": self.decode_s, "prefill_calls": self.prefill_calls,
        }


@dataclass(frozen=True)
class StopConfig:
    max_new_tokens: int
    eos_ids: tuple[int, ...]


def chain_inputs(cache: KVCache, tokens: list[int]):
    """Step inputs for a causal chain of new tokens after the committed cache."""
    n = len(tokens)
    past = cache.past_for(n)
    positions = cache.length + np.arange(n, dtype=np.int64)
    mask = np.concatenate(
        [np.broadcast_to(cache.valid_mask(), (n, past.shape[4])), np.tri(n, dtype=bool)], axis=1
    )
    return (np.asarray([tokens], dtype=np.int64), positions[None], past, mask[None])


def prefill(step: StepFunction, cache: KVCache, prompt: list[int], chunk: int) -> np.ndarray:
    """Run the prompt through in chunks of at most ``chunk``; return the last logits row."""
    for start in range(0, len(prompt), chunk):
        piece = prompt[start : start + chunk]
        out = step(*chain_inputs(cache, piece))
        cache.commit(out["present"], np.arange(len(piece)))
    return out["logits"][0, -1]


def autoregressive(
    step: StepFunction,
    cache: KVCache,
    prompt: list[int],
    chunk: int,
    sampling: SamplingConfig,
    stop: StopConfig,
    rng: np.random.Generator,
    stats: GenerationStats,
) -> Iterator[list[int]]:
    """Yield each new token (as a one-element list) until EOS, the budget or max_seq."""
    start = time.perf_counter()
    logits = prefill(step, cache, prompt, chunk)
    stats.prompt_tokens = len(prompt)
    stats.prefill_calls = -(-len(prompt) // chunk)
    stats.prefill_s = time.perf_counter() - start
    stats.steps = 1  # the last prefill call already predicts the first new token
    start = time.perf_counter()
    while True:
        token = sample(logits, sampling, rng)
        stats.new_tokens += 1
        stats.accepted_per_step.append(1)
        stats.decode_s += time.perf_counter() - start
        yield [token]  # consumer time is not decode time
        if (token in stop.eos_ids or stats.new_tokens >= stop.max_new_tokens
                or cache.length + 1 > cache.max_seq):
            return
        start = time.perf_counter()
        out = step(*chain_inputs(cache, [token]))
        cache.commit(out["present"], [0])
        logits = out["logits"][0, -1]
        stats.steps += 1
