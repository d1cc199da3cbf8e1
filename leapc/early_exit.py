"""Build-time early exit: lower the draft, remainder and Kangaroo programs; `--exit-layer auto`.

`--exit-layer auto` measures what the policy will do rather than predicting it: greedy
``early-exit`` tokens/s for every candidate exit layer x draft length, with the lowered
programs on the target backend, on calibration prompts (training-split windows, never the
benchmarks' held-out ones), against ``ar`` on the same prompts in the same run
(`leapc.measure`). The fastest point becomes the engine's exit layer and
its draft length the policy's default; the whole sweep goes into the manifest.

Its build stages: `EXIT` (the draft and remainder programs, given or swept) and `ADAPTER`
(Kangaroo's adapter at that exit, and its measured draft length and stop).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from leapc.heads import calibration_prompts
from leapc.ir.adapter import KangarooAdapter
from leapc.ir.capture import CapturedProgram
from leapc.measure import AR, measure_drafters
from leapc.models.adapter import FILES as ADAPTER_FILES
from leapc.models.train_adapter import AdapterTraining, trained_adapter
from leapc.passes.pipeline import Pipeline
from leapc.passes.slice_draft import SliceDraft
from leapc.passes.slice_kangaroo import SliceKangaroo
from leapc.passes.slice_remainder import SliceRemainder
from leapc.passes.unroll_draft_chain import UnrollDraftChain
from leapc.runtime.backends.base import Backend, Compression, Lowering, lower_program
from leapc.runtime.manifest import (
    AdapterInfo,
    Attention,
    ExitChoice,
    ExitPoint,
    KangarooPoint,
    ProgramEntry,
    file_digests,
)
from leapc.runtime.policies import (
    DEFAULT_EXIT_DEPTH,
    POLICIES,
    DraftOptions,
    Policy,
    measured_drafter,
)
from leapc.runtime.step import unrolled
from leapc.stage import AUTO, BuildState, Stage

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


def lower_exit(program: CapturedProgram, layer: int, lowering: Lowering,
               out: Path) -> dict[str, ProgramEntry]:
    """The ``draft`` (layers < E and the exit) and ``remainder`` (layers >= E) programs,
    sliced from the final full program so they keep its rewrites and numbers.

    The exit's logits only propose: the draft's vocabulary projection may be approximate
    (`Compression.VOCAB_PROJECTION`); it drafts from the same hidden state and KV rows,
    which stay exact, as the remainder does."""
    return {"draft": lower_program(lowering, Pipeline((SliceDraft(layer),))(program).program, out, "draft",
                                   Compression.VOCAB_PROJECTION),
            "remainder": lower_program(lowering, Pipeline((SliceRemainder(layer),))(program).program, out,
                                       "remainder")}


def lower_exit_chain(program: CapturedProgram, layer: int, depth: int, lowering: Lowering,
                     out: Path) -> dict[str, ProgramEntry]:
    """The exit's greedy chain of ``depth`` tokens in one call (``draft_chain``): the draft
    sliced as `lower_exit` does, unrolled with the closing call verification reads."""
    passes = (SliceDraft(layer), UnrollDraftChain(depth, closing_call=True))
    name = unrolled("draft")
    return {name: lower_program(lowering, Pipeline(passes)(program).program, out, name,
                                Compression.VOCAB_PROJECTION)}


def lower_kangaroo(program: CapturedProgram, layer: int, adapter: KangarooAdapter,
                   lowering: Lowering, out: Path) -> ProgramEntry:
    """The ``kangaroo`` program: layers < E, the adapter, the model's head."""
    return lower_program(lowering, Pipeline((SliceKangaroo(layer, adapter),))(program).program, out, "kangaroo",
                         Compression.VOCAB_PROJECTION)


@dataclass(frozen=True)
class AdapterOptions:
    """`--train-adapter PATH`: Kangaroo's adapter at the exit, from ``directory`` when it
    holds one for this model and exit layer, else trained into it (``training``)."""

    directory: Path
    training: AdapterTraining = AdapterTraining()


def _move_programs(entries: dict[str, ProgramEntry], source: Path, out: Path) -> None:
    for entry in entries.values():
        for name in (entry.file, *entry.data_files):
            shutil.move(source / name, out / name)


# ------------------------------------------------------------------ stage: the exit


def _exit(state: BuildState) -> None:
    """The early-exit ``draft`` and ``remainder`` programs at the given exit layer, or at
    the fastest point of the measured sweep (``AUTO``)."""
    layer, backend = state.options.exit_layer, state.options.backend
    if layer is AUTO:
        layer, entries, choice = _sweep_exits(state)
    else:
        state.on_stage(f"lower draft and remainder, exit at layer {layer} ({backend.value})")
        entries = lower_exit(state.full.result.program, layer, state.lowering, state.out)
        choice = ExitChoice(source="given", depth=DEFAULT_EXIT_DEPTH)
    if _builds_chain(state.lowering):
        state.on_stage(f"lower the draft chain of {choice.depth} ({backend.value})")
        entries |= lower_exit_chain(state.full.result.program, layer, choice.depth,
                                    state.lowering, state.out)
    else:
        state.on_stage(f"no draft chain ({backend.value}, {state.options.attention.value} attention)")
    state.update(programs=state.manifest.programs | entries, exit_layer=layer,
                 exit_choice=choice)


def _builds_chain(lowering: Lowering) -> bool:
    """Whether the exit gets an unrolled chain: where the chain's rows are the target's own
    bit for bit (the remainder keeps them; a chain's later calls read more key slots than
    the target's step read for the same token) and one call pays.
    - ORT's tree lowering computes over the valid keys alone: exact (tested, bundled and
      tiny models), and built.
    - leapc's kernels (int8, bf16) can give a chain the step's rows too: built as an
      experiment, with its weights packed once and its later calls' attention fused as
      the step's, it left 16 of 16 code_heldout prompts identical to `ar` (bundled, int8).
      But a call's time there is its GEMMs', the same in one call or four, and the chain's
      joins cost more than the calls it saves: `early-exit` ran at 0.91x stepwise drafting
      (same engine, 6 rounds). Not built.
    - The ONNX width-invariant lowering (int4) is exact across free slots but not across
      where a nonzero term sits (`early-exit` left `ar`'s tokens on 7 of 16 prompts), and
      the other backends' lowerings read every slot under a mask: no chain."""
    return lowering.backend is Backend.ORT and lowering.attention is Attention.TREE


def _sweep_exits(state: BuildState) -> tuple[int, dict[str, ProgramEntry], ExitChoice]:
    """Lower every candidate exit into its own directory, measure ``early-exit`` at each
    layer x draft length, keep the fastest layer's programs."""
    full, backend = state.full, state.options.backend
    program, dims = full.result.program, full.result.program.dims
    layers = exit_candidates(dims.num_layers)
    state.on_stage(f"lower exits at layers {layers.start}..{layers.stop - 1} ({backend.value})")
    work = state.out / ".exit-sweep"
    lowered = {}
    for layer in layers:
        (work / str(layer)).mkdir(parents=True)
        lowered[layer] = lower_exit(program, layer, state.lowering, work / str(layer))
    state.on_stage(f"exit sweep: {len(layers)} layers x {len(EXIT_DEPTHS)} draft lengths")
    grid = {}
    for layer, entries in lowered.items():
        programs = {name: state.program(e, work / str(layer)) for name, e in entries.items()}
        facts = state.manifest.model_copy(update={"exit_layer": layer})
        for depth in EXIT_DEPTHS:
            grid[layer, depth] = measured_drafter(Policy.EARLY_EXIT, facts, programs,
                                                  DraftOptions(max_draft=depth))
    measured = measure_drafters(state.program(full.entry), dims, grid,
                                calibration_prompts(full.source, None),
                                state.capture.max_seq, state.capture.max_new)
    ar = measured.pop(AR)[0]
    points = tuple(ExitPoint(layer=layer, depth=depth, tokens_per_s=tps, tau=tau)
                   for (layer, depth), (tps, tau) in measured.items())
    best = max(points, key=lambda p: p.tokens_per_s)
    _move_programs(lowered[best.layer], work / str(best.layer), state.out)
    shutil.rmtree(work)
    choice = ExitChoice(source="auto", depth=best.depth, ar_tokens_per_s=ar, sweep=points)
    return best.layer, lowered[best.layer], choice


# ------------------------------------------------------------------ stage: Kangaroo's adapter


def _adapter(state: BuildState) -> None:
    """Kangaroo: the adapter at the engine's exit (trained, or read from its directory),
    the ``kangaroo`` program, its measured draft length and stop, and a copy of the
    adapter's files in the engine."""
    full, options, manifest = state.full, state.options.adapter, state.manifest
    program, layer = full.result.program, manifest.exit_layer
    state.on_stage(f"kangaroo adapter at layer {layer}")
    adapter, report = trained_adapter(full.source, program, layer, options.directory,
                                      options.training)
    entry = lower_kangaroo(program, layer, adapter, state.lowering, state.out)
    state.on_stage("kangaroo: measure draft lengths x stops")
    programs = {"kangaroo": state.program(entry),
                "remainder": state.program(manifest.programs["remainder"])}
    grid = {(d, c): measured_drafter(Policy.KANGAROO, manifest, programs,
                                     DraftOptions(max_draft=d, confidence=c))
            for d in KANGAROO_DEPTHS for c in KANGAROO_CONFIDENCES}
    measured = measure_drafters(state.program(full.entry), program.dims, grid,
                                calibration_prompts(full.source, None), manifest.max_seq,
                                manifest.max_new,
                                extra_layers=POLICIES[Policy.KANGAROO].extra_layers)
    ar = measured.pop(AR)[0]
    sweep = tuple(KangarooPoint(depth=d, confidence=c, tokens_per_s=tps, tau=tau)
                  for (d, c), (tps, tau) in measured.items())
    best = max(sweep, key=lambda p: p.tokens_per_s)
    info = AdapterInfo(steps=report.steps, seconds=report.seconds,
                       agreement_before=report.agreement_before,
                       agreement_after=report.agreement_after, depth=best.depth,
                       confidence=best.confidence, ar_tokens_per_s=ar, sweep=sweep,
                       sha256=file_digests(_copy_adapter(options.directory,
                                                         state.out / "adapter")))
    state.update(programs=manifest.programs | {"kangaroo": entry}, adapter=info)


def _copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ADAPTER_FILES:
        shutil.copyfile(source / name, target / name)
    return target


EXIT = Stage("early exit", lambda o: 0 if o.exit_layer is None else 2 + (o.exit_layer is AUTO),
             _exit)
ADAPTER = Stage("kangaroo adapter", lambda o: 2 * (o.adapter is not None), _adapter)
