"""Build-time early exit: lower the draft and remainder programs; `--exit-layer auto`.

`--exit-layer auto` measures what the policy will do rather than predicting it: greedy
``early-exit`` tokens/s for every candidate exit layer x draft length, with the lowered
programs on the target backend, on calibration prompts (training-split windows, never the
benchmarks' held-out ones), against ``ar`` on the same prompts in the same run
(`leapc.measure`). The fastest point becomes the engine's exit layer and
its draft length the policy's default; the whole sweep goes into the manifest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from leapc.ir.capture import CapturedProgram
from leapc.measure import AR, DrafterFactory, measure_drafters
from leapc.passes.slice_early_exit import slice_draft, slice_remainder
from leapc.runtime.backends import ort
from leapc.runtime.backends.base import StepFunction
from leapc.runtime.drafters.early_exit import EarlyExitDrafter
from leapc.runtime.manifest import Backend, ExitPoint, ProgramEntry, sha256_file
from leapc.runtime.sampling import SamplingConfig

EXIT_DEPTHS = (1, 2, 3, 4, 6)
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
    """``ar`` tokens/s and every (exit layer, depth) point."""
    def early_exit(layer: int, depth: int) -> DrafterFactory:
        draft, remainder = exits[layer]
        return lambda kv: EarlyExitDrafter(draft, kv, layer, SamplingConfig(),
                                           np.random.default_rng(0), depth, remainder=remainder)

    measured = measure_drafters(step, dims, {(layer, depth): early_exit(layer, depth)
                                             for layer in exits for depth in EXIT_DEPTHS},
                                prompts, max_seq, chunk)
    ar = measured.pop(AR)[0]
    return ar, tuple(ExitPoint(layer=layer, depth=depth, tokens_per_s=tps, tau=tau)
                     for (layer, depth), (tps, tau) in measured.items())
