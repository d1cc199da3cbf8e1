"""Build-time early exit: lower the draft and remainder programs; `--exit-layer auto`.

`--exit-layer auto` measures what the policy will do rather than predicting it: greedy
``early-exit`` tokens/s for every candidate exit layer x draft length, with the lowered
programs on the target backend, on calibration prompts (training-split windows, never the
benchmarks' held-out ones), against ``ar`` on the same prompts in the same run,
interleaved, median of the repeats. The fastest point becomes the engine's exit layer and
its draft length the policy's default; the whole sweep goes into the manifest.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from leapc.ir.capture import CapturedProgram
from leapc.passes.slice_early_exit import slice_draft, slice_remainder
from leapc.runtime.backends import ort
from leapc.runtime.backends.base import StepFunction
from leapc.runtime.decode import GenerationStats, StopConfig, decode
from leapc.runtime.drafters.base import Drafter, NoDrafter
from leapc.runtime.drafters.early_exit import EarlyExitDrafter
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.manifest import Backend, ExitPoint, ProgramEntry, sha256_file
from leapc.runtime.sampling import SamplingConfig

AUTO = "auto"
EXIT_DEPTHS = (1, 2, 3, 4, 6)
SWEEP = dict(prompts=4, new_tokens=64, repeats=3)
Lowering = Callable[[CapturedProgram, Path, str], Path]


def exit_candidates(num_layers: int) -> range:
    """Exit layers the sweep measures: from a sixth to half of the layers. Lower exits
    rarely agree with the model; higher ones cost nearly a full step per draft token."""
    return range(max(1, num_layers // 6), max(2, num_layers // 2 + 1))


def lower_exit(program: CapturedProgram, layer: int, backend: Backend, lower: Lowering,
               out: Path) -> dict[str, ProgramEntry]:
    """The ``draft`` (layers < E and the exit) and ``remainder`` (layers >= E) programs,
    sliced from the final full program so they keep its rewrites and numbers."""
    entries = {}
    for name, cut in (("draft", slice_draft), ("remainder", slice_remainder)):
        sliced = cut(program, layer)
        file = lower(sliced, out, name)
        if name == "draft" and backend is Backend.ORT:
            # The exit's logits only propose: an int8 vocabulary projection drafts from the
            # same hidden state and KV rows, which stay float and exact.
            ort.quantize_vocab_projection(file, sliced.dims.vocab_size)
        entries[name] = ProgramEntry(file=file.name, sha256=sha256_file(file),
                                     signature=sliced.signature.to_json())
    return entries


def move_programs(entries: dict[str, ProgramEntry], source: Path, out: Path) -> None:
    for entry in entries.values():
        shutil.move(source / entry.file, out / entry.file)


def sweep_exits(step: StepFunction, exits: dict[int, tuple[StepFunction, StepFunction]],
                dims, prompts: list[list[int]], max_seq: int,
                chunk: int) -> tuple[float, tuple[ExitPoint, ...]]:
    """``ar`` tokens/s and every (exit layer, depth) point, greedy, interleaved repeats."""
    def cache() -> KVCache:
        return KVCache(dims.num_layers, dims.num_kv_heads, dims.head_dim, dims.dtype, max_seq)

    def early_exit(layer: int, depth: int) -> Callable[[KVCache], Drafter]:
        draft, remainder = exits[layer]
        return lambda kv: EarlyExitDrafter(draft, remainder, kv, layer, SamplingConfig(),
                                           np.random.default_rng(0), depth)

    configs = {None: lambda kv: NoDrafter()} | {
        (layer, depth): early_exit(layer, depth) for layer in exits for depth in EXIT_DEPTHS}
    runs = {key: [] for key in configs}
    for _ in range(SWEEP["repeats"]):
        for key, drafter in configs.items():
            runs[key].append(_measure(step, cache, drafter, prompts, chunk))
    ar = runs.pop(None)
    points = tuple(ExitPoint(layer=layer, depth=depth,
                             tokens_per_s=round(statistics.median(r[0] for r in measured), 1),
                             tau=round(measured[0][1], 3))  # greedy: the same every repeat
                   for (layer, depth), measured in runs.items())
    return round(statistics.median(r[0] for r in ar), 1), points


def _measure(step: StepFunction, cache: Callable[[], KVCache],
             drafter: Callable[[KVCache], Drafter], prompts: list[list[int]],
             chunk: int) -> tuple[float, float]:
    """Decode tokens/s (prefill excluded: it is the same for every configuration) and tau."""
    new = steps = 0
    seconds = 0.0
    for prompt in prompts:
        kv, stats = cache(), GenerationStats("sweep")
        for _ in decode(step, kv, prompt, chunk, drafter(kv), SamplingConfig(),
                        StopConfig(SWEEP["new_tokens"], ()), np.random.default_rng(0), stats):
            pass
        new, steps, seconds = new + stats.new_tokens, steps + stats.steps, seconds + stats.decode_s
    return new / seconds, new / steps
