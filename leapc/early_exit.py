"""Build-time early exit: lower the draft, remainder and Kangaroo programs; `--exit-layer auto`.

`--exit-layer auto` measures what the policy will do rather than predicting it: greedy
``early-exit`` tokens/s for every candidate exit layer x draft length, with the lowered
programs on the target backend, on calibration prompts (training-split windows, never the
benchmarks' held-out ones), against ``ar`` on the same prompts in the same run
(`leapc.measure`). The fastest point becomes the engine's exit layer and
its draft length the policy's default; the whole sweep goes into the manifest.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leapc.ir.adapter import KangarooAdapter
from leapc.ir.capture import CapturedProgram
from leapc.measure import AR, DrafterFactory, measure_drafters
from leapc.models.train_adapter import AdapterTraining
from leapc.passes.slice_early_exit import slice_draft, slice_kangaroo, slice_remainder
from leapc.runtime.backends.base import Compression, StepFunction, lower_program
from leapc.runtime.drafters.early_exit import EarlyExitDrafter, KangarooDrafter
from leapc.runtime.manifest import Backend, ExitPoint, KangarooPoint, ProgramEntry
from leapc.runtime.sampling import SamplingConfig

EXIT_DEPTHS = (1, 2, 3, 4, 6)
# Kangaroo's measured grid: longest chain x stop below this top-1 probability. Small
# models are rarely confident (the bundled model's exit: mostly below 0.5), so the stops
# start low. Chains stop at 8: the calibration text (training windows) is more predictable
# than new text, and with 12 allowed the build picked chains that were slower held out.
KANGAROO_DEPTHS = (4, 8)
KANGAROO_CONFIDENCES = (0.02, 0.05, 0.1, 0.2, 0.4)


def exit_candidates(num_layers: int) -> range:
    """Exit layers the sweep measures: from a sixth to half of the layers. Lower exits
    rarely agree with the model; higher ones cost nearly a full step per draft token."""
    return range(max(1, num_layers // 6), max(2, num_layers // 2 + 1))


def lower_exit(program: CapturedProgram, layer: int, backend: Backend,
               out: Path) -> dict[str, ProgramEntry]:
    """The ``draft`` (layers < E and the exit) and ``remainder`` (layers >= E) programs,
    sliced from the final full program so they keep its rewrites and numbers.

    The exit's logits only propose: the draft's vocabulary projection may be approximate
    (`Compression.VOCAB_PROJECTION`); it drafts from the same hidden state and KV rows,
    which stay exact, as the remainder does."""
    return {"draft": lower_program(backend, slice_draft(program, layer), out, "draft",
                                   Compression.VOCAB_PROJECTION),
            "remainder": lower_program(backend, slice_remainder(program, layer), out,
                                       "remainder")}


def lower_kangaroo(program: CapturedProgram, layer: int, adapter: KangarooAdapter,
                   backend: Backend, out: Path) -> ProgramEntry:
    """The ``kangaroo`` program: layers < E, the adapter, the model's head."""
    return lower_program(backend, slice_kangaroo(program, layer, adapter), out, "kangaroo",
                         Compression.VOCAB_PROJECTION)


@dataclass(frozen=True)
class AdapterOptions:
    """`--train-adapter PATH`: Kangaroo's adapter at the exit, from ``directory`` when it
    holds one for this model and exit layer, else trained into it (``training``)."""

    directory: Path
    training: AdapterTraining = AdapterTraining()


def move_programs(entries: dict[str, ProgramEntry], source: Path, out: Path) -> None:
    for entry in entries.values():
        for name in (entry.file, *entry.data_files):
            shutil.move(source / name, out / name)


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


def sweep_kangaroo(step: StepFunction, kangaroo: StepFunction, remainder: StepFunction,
                   layer: int, dims, prompts: list[list[int]], max_seq: int,
                   chunk: int) -> tuple[float, tuple[KangarooPoint, ...]]:
    """``ar`` tokens/s and every (draft length, confidence) point of ``kangaroo``."""
    def drafter(depth: int, confidence: float) -> DrafterFactory:
        return lambda kv: KangarooDrafter(kangaroo, kv, layer, SamplingConfig(),
                                          np.random.default_rng(0), depth, confidence,
                                          remainder=remainder, chunk=chunk)

    grid = {(d, c): drafter(d, c) for d in KANGAROO_DEPTHS for c in KANGAROO_CONFIDENCES}
    measured = measure_drafters(step, dims, grid, prompts, max_seq, chunk, extra_layers=1)
    ar = measured.pop(AR)[0]
    return ar, tuple(KangarooPoint(depth=d, confidence=c, tokens_per_s=tps, tau=tau)
                     for (d, c), (tps, tau) in measured.items())
