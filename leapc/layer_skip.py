"""Build-time layer skip: `--skip auto`, Draft&Verify's skip-set search, then measured.

1. **Path** (`search_path`): greedy, on the source model in torch. Start from bypassing
   nothing; at each step bypass the one more sublayer (an attention or an MLP branch)
   that keeps the draft's argmax agreement with the model highest, on the model's greedy
   continuations of calibration prompts (training-split windows). Draft&Verify optimises
   the same objective with Bayesian optimisation; the greedy path is deterministic and
   costs (sublayers)^2 batched forwards of a few hundred tokens.
2. **Choice**: the path's sets at a few sizes are lowered and `layer-skip` is measured at
   a few draft lengths on the target backend with `ar` in the same run (`leapc.measure`);
   the fastest is kept. Agreement alone cannot choose: a bigger set is cheaper per call
   and less often right, and which wins depends on the backend's per-call costs.

Its build stage: `SKIP` (the skip drafts, given or searched).
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from leapc.heads import calibration_prompts, greedy_continuation
from leapc.ir.errors import InputError
from leapc.ir.skip_spec import SkipSet
from leapc.measure import AR, measure_drafters
from leapc.passes.pipeline import Pipeline
from leapc.passes.skip_layers import SkipLayers
from leapc.runtime.backends.base import Compression, lower_program
from leapc.runtime.manifest import ProgramEntry, SkipChoice, SkipPoint
from leapc.runtime.policies import DEFAULT_SKIP_DEPTH, DraftOptions, Policy, measured_drafter
from leapc.stage import AUTO, BuildState, Stage

SKIP_FRACTIONS = (0.25, 0.4, 0.6)  # of the 2L sublayers: the sets measured
SKIP_DEPTHS = (2, 3, 4)
SEARCH = dict(prompts=6, new_tokens=64)


def _branches(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Each decoder layer's attention and MLP modules (HF's names for them)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None) or ()
    branches = [(getattr(layer, "self_attn", None) or getattr(layer, "attn", None),
                 getattr(layer, "mlp", None)) for layer in layers]
    if not branches or any(a is None or m is None for a, m in branches):
        raise InputError("--skip auto: this model's layers are not attention + mlp modules "
                         "it recognises; give the sublayers to skip (--skip 2,a5,m7)")
    return branches


def _zero(module, args, output):
    """A forward hook: the branch adds nothing to the residual stream."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@contextlib.contextmanager
def _bypassed(model, skip: SkipSet):
    branches = _branches(model)
    handles = [branches[i][0].register_forward_hook(_zero) for i in skip.attention]
    handles += [branches[i][1].register_forward_hook(_zero) for i in skip.mlp]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def search_path(model, prompts: list[list[int]]) -> list[tuple[SkipSet, float]]:
    """The greedy path: after each step the set and its argmax agreement with the model."""
    layers = len(_branches(model))
    prompts = prompts[: SEARCH["prompts"]]
    sequences = [greedy_continuation(model, p, SEARCH["new_tokens"]) for p in prompts]
    length = min(len(s) for s in sequences)
    batch = torch.stack([s[:length] for s in sequences])
    start = min(len(p) for p in prompts)  # score the continuations only
    target = model(batch).logits[:, start:].argmax(-1)

    def agreement(skip: SkipSet) -> float:
        with _bypassed(model, skip):
            drafted = model(batch).logits[:, start:].argmax(-1)
        return float((drafted == target).float().mean())

    path, skip = [], SkipSet()
    moves = [("attention", i) for i in range(layers)] + [("mlp", i) for i in range(layers)]
    for _ in range(int(max(SKIP_FRACTIONS) * 2 * layers)):
        scored = [(agreement(grown), grown) for grown in map(skip.adding, moves)
                  if grown != skip and grown.keeps_attention(layers)]
        best, skip = max(scored, key=lambda pair: pair[0])
        path.append((skip, best))
    return path


def candidates(path: list[tuple[SkipSet, float]], layers: int) -> list[SkipSet]:
    """The path's sets at the measured sizes."""
    sizes = sorted({max(1, round(f * 2 * layers)) for f in SKIP_FRACTIONS})
    return list(dict.fromkeys(path[min(size, len(path)) - 1][0] for size in sizes))


# ------------------------------------------------------------------ build stage


def _skip(state: BuildState) -> None:
    """The skip drafts: program ``skip_<i>`` bypasses ``candidates[i]``, the given set or
    every set `--skip auto` measured (the fastest being the engine's ``skip``)."""
    skip, backend = state.options.skip, state.options.backend
    if skip is AUTO:
        skip, sets, entries, choice = _search(state)
    else:
        state.on_stage(f"lower skip draft, skipping {skip} ({backend.value})")
        sets, entries = [skip], [_lower_skip(state, skip, 0)]
        choice = SkipChoice(source="given", depth=DEFAULT_SKIP_DEPTH)
    choice = choice.model_copy(update={"candidates": tuple(map(str, sets))})
    state.update(programs=state.manifest.programs | {f"skip_{i}": e
                                                     for i, e in enumerate(entries)},
                 skip=str(skip), skip_choice=choice)


def _lower_skip(state: BuildState, skip: SkipSet, index: int) -> ProgramEntry:
    sliced = Pipeline((SkipLayers(skip),))(state.full.result.program).program
    # The draft only proposes and its rows are scratch: all of it may be approximate.
    return lower_program(state.lowering, sliced, state.out, f"skip_{index}",
                         Compression.DRAFT)


def _search(state: BuildState) -> tuple[SkipSet, list[SkipSet], list[ProgramEntry], SkipChoice]:
    """The greedy agreement path's sets at a few sizes, lowered; ``layer-skip`` measured
    with each at a few draft lengths; the fastest kept."""
    full, backend = state.full, state.options.backend
    dims = full.result.program.dims
    state.on_stage("skip search: greedy agreement path")
    prompts = calibration_prompts(full.source, None)
    path = search_path(full.source.model, prompts)
    sets = candidates(path, dims.num_layers)
    state.on_stage(f"skip search: lower and measure {len(sets)} sets ({backend.value})")
    entries = [_lower_skip(state, skip, i) for i, skip in enumerate(sets)]
    programs = {f"skip_{i}": state.program(e) for i, e in enumerate(entries)}
    names = tuple(map(str, sets))
    grid = {}
    for i, depth in itertools.product(range(len(sets)), SKIP_DEPTHS):
        facts = state.manifest.model_copy(update={
            "skip": names[i],
            "skip_choice": SkipChoice(source="auto", depth=depth, candidates=names)})
        grid[i, depth] = measured_drafter(Policy.LAYER_SKIP, facts, programs,
                                          DraftOptions(max_draft=depth))
    measured = measure_drafters(state.program(full.entry), dims, grid, prompts,
                                state.capture.max_seq, state.capture.max_new)
    ar = measured.pop(AR)[0]
    (best, depth), _ = max(measured.items(), key=lambda item: item[1][0])
    choice = SkipChoice(source="auto", depth=depth, ar_tokens_per_s=ar,
                        path=tuple((str(s), round(a, 4)) for s, a in path),
                        points=tuple(SkipPoint(skip=names[i], depth=d, tokens_per_s=tps,
                                               tau=tau)
                                     for (i, d), (tps, tau) in measured.items()))
    return sets[best], sets, entries, choice


SKIP = Stage("layer skip", lambda o: 0 if o.skip is None else 1 + (o.skip is AUTO), _skip)
