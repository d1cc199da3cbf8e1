"""Measure decoding policies at build time, the way the runtime will run them.

Build-time choices that depend on speed (`--exit-layer auto`, `--skip auto`) decode the
same calibration prompts greedily with each candidate drafter and the lowered programs on
the target backend, `ar` included, interleaved, and keep the median of the repeats.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable

import numpy as np

from leapc.runtime.decode import GenerationStats, StopConfig, decode
from leapc.runtime.drafters.base import Drafter, NoDrafter
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.policies import new_cache
from leapc.runtime.sampling import SamplingConfig
from leapc.runtime.step import StepFunction

MEASURE = dict(prompts=4, new_tokens=64, repeats=3)
AR = "ar"
DrafterFactory = Callable[[KVCache], Drafter]


def measure_drafters(step: StepFunction, dims, drafters: dict[Hashable, DrafterFactory],
                     prompts: list[list[int]], max_seq: int, chunk: int,
                     extra_layers: int = 0) -> dict[Hashable, tuple[float, float]]:
    """(decode tokens/s, tau) of each drafter and of `ar` (key ``AR``): greedy, interleaved,
    median tokens/s of the repeats (tau is the same every repeat). ``extra_layers``: the
    cache's, for drafters that keep rows there (Kangaroo)."""
    def cache() -> KVCache:
        return new_cache(dims, max_seq, extra_layers)

    configs = {AR: lambda kv: NoDrafter()} | drafters
    runs = {key: [] for key in configs}
    for _ in range(MEASURE["repeats"]):
        for key, drafter in configs.items():
            runs[key].append(_measure(step, cache, drafter, prompts[: MEASURE["prompts"]], chunk))
    return {key: (round(statistics.median(r[0] for r in measured), 1), round(measured[0][1], 3))
            for key, measured in runs.items()}


def _measure(step: StepFunction, cache: Callable[[], KVCache], drafter: DrafterFactory,
             prompts: list[list[int]], chunk: int) -> tuple[float, float]:
    """Decode tokens/s (prefill excluded: it is the same for every configuration) and tau."""
    new = steps = 0
    seconds = 0.0
    for prompt in prompts:
        kv, stats = cache(), GenerationStats("measure")
        for _ in decode(step, kv, prompt, chunk, drafter(kv), SamplingConfig(),
                        StopConfig(MEASURE["new_tokens"], ()), np.random.default_rng(0), stats):
            pass
        new, steps, seconds = new + stats.new_tokens, steps + stats.steps, seconds + stats.decode_s
    return new / seconds, new / steps
