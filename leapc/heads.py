"""Decoding heads at build time: where the trained heads come from, and which static tree.

Heads come from ``--train-heads TEXT`` (the self-distillation recipe, run on that text) or,
for the bundled model, from the heads it ships. The static tree is a hand-written default,
a file of rank paths, or ``auto``: the acceptance of every head rank is measured on the
model's own greedy continuations of calibration text, the verify step's cost by node count
is measured on the engine just lowered, and Sequoia's program (`leapc.ir.tree_search`)
picks the tree and node budget that maximise predicted tokens per second.

Its build stages: `HEADS` (train or load them, before the full program's pipeline inserts
them) and `HEADS_PROGRAM` (the ``heads`` program, the saved weights, the tree).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from leapc.datastore import DatastoreSource, read_texts
from leapc.ir.errors import InputError
from leapc.ir.head_spec import HeadKind, HeadPlacement, HeadsConfig
from leapc.ir.heads import DecodingHeads, capture_heads, project
from leapc.ir.tree_search import AcceptanceTable, Budget, best_budget
from leapc.models import corpus
from leapc.models.heads import HeadsReport, bundled_heads_dir, load_heads, save_heads
from leapc.models.loaders import BUNDLED, SourceModel
from leapc.models.train_heads import HeadsTraining, train_heads
from leapc.runtime.backends.base import Compression, lower_program
from leapc.runtime.manifest import (
    Backend,
    HeadsInfo,
    ProgramEntry,
    Quantization,
    TreeChoice,
    file_digests,
)
from leapc.runtime.step import StepFunction
from leapc.stage import AUTO, Auto, BuildOptions, BuildState, Stage

# Hand-written for four heads (Medusa-style: wide near the root, one path deep), 15 nodes.
DEFAULT_TREE = ((0,), (1,), (2,), (0, 0), (0, 1), (0, 2), (1, 0), (0, 0, 0), (0, 0, 1),
                (0, 1, 0), (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0))
CALIBRATION = dict(prompts=16, prompt_tokens=64, new_tokens=96, ranks=8)


@dataclass(frozen=True)
class HeadsOptions:
    """``leapc build --heads K --head-kind ... --train-heads TEXT --tree auto|FILE``."""

    count: int = 4
    kind: HeadKind = HeadKind.MEDUSA
    train_text: DatastoreSource | None = None  # None: the heads the bundled model ships
    tree: Path | Auto | None = None  # None: DEFAULT_TREE (trimmed to K heads); AUTO; a file
    placement: HeadPlacement = HeadPlacement.PROGRAM
    # --train-heads: the recipe's budget (`leapc.models.train_heads.HeadsTraining`)
    training_steps: int = HeadsTraining.steps
    training_sequences: int = HeadsTraining.sequences
    training_context: int = HeadsTraining.context


def _token_stream(source: SourceModel, text: DatastoreSource) -> np.ndarray:
    description, texts = read_texts(text)
    ids = [enc.ids for enc in source.tokenizer.encode_batch(texts, add_special_tokens=False)]
    stream = np.concatenate([np.asarray(d, dtype=np.int64) for d in ids])
    if len(stream) < 1024:  # 5% is held out, and prompts are windows of 32 tokens
        raise InputError(f"--train-heads {description}: {len(stream)} tokens is too little "
                         "text to train heads on (at least 1024)")
    return stream


def obtain_heads(source: SourceModel, options: HeadsOptions,
                 work: Path) -> tuple[DecodingHeads, HeadsReport]:
    """Train heads on ``options.train_text`` or load the bundled model's."""
    hidden = source.model.config.get_text_config().hidden_size
    if options.train_text is None:
        if source.name != BUNDLED:
            raise InputError(f"no trained heads ship for {source.name}: pass --train-heads TEXT")
        heads, report = load_heads(bundled_heads_dir(options.kind), hidden)
        if heads.config.num_heads != options.count:
            raise InputError(f"the bundled model ships {heads.config.num_heads} "
                             f"{options.kind.value} heads; pass --heads "
                             f"{heads.config.num_heads} or --train-heads TEXT")
        return heads, report
    stream = _token_stream(source, options.train_text)
    split = int(len(stream) * 0.95)
    config = HeadsTraining(HeadsConfig(options.kind, options.count),
                           steps=options.training_steps, sequences=options.training_sequences,
                           context=options.training_context)
    return train_heads(source.model, stream[:split], stream[split:], config, work)


# ---------------------------------------------------------------------------- trees


def read_tree(path: Path, num_heads: int) -> tuple[tuple[int, ...], ...]:
    """A JSON list of rank paths (``[[0], [1], [0, 0]]``), checked against the heads."""
    try:
        paths = tuple(tuple(int(r) for r in p) for p in json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"--tree {path}: not a JSON list of rank paths ({err})") from None
    if not paths or any(not p or min(p) < 0 for p in paths):
        raise InputError(f"--tree {path}: every path needs one or more ranks >= 0")
    if max(map(len, paths)) > num_heads:
        raise InputError(f"--tree {path}: a path of {max(map(len, paths))} ranks needs more "
                         f"than the {num_heads} heads")
    return paths


def default_tree(num_heads: int) -> tuple[tuple[int, ...], ...]:
    return tuple(p for p in DEFAULT_TREE if len(p) <= num_heads)


def calibration_prompts(source: SourceModel, text: DatastoreSource | None) -> list[list[int]]:
    """Token windows of the training text (never the held-out files benchmarks use)."""
    if text is None:
        texts = [f.text for f in corpus.read_stdlib() if not f.held_out]
    else:
        texts = read_texts(text)[1]
    return corpus.text_windows(source.tokenizer, texts, CALIBRATION["prompts"], CALIBRATION["prompt_tokens"])


@torch.no_grad()
def measure_acceptance(model, heads: DecodingHeads, prompts: list[list[int]]) -> AcceptanceTable:
    """Per depth and rank: how often the model's own greedy token is the head's rank-r
    candidate, counted where every shallower depth's token was within the measured ranks
    (its parent would have been in a tree of those ranks)."""
    ranks, k = CALIBRATION["ranks"], heads.config.num_heads
    hits, trials = np.zeros((k, ranks)), np.zeros(k)
    for prompt in prompts:
        seq = greedy_continuation(model, prompt, CALIBRATION["new_tokens"])
        found = _ranks(model, heads, seq, len(prompt) - 1)  # [positions, K]
        reached = np.ones(len(found), dtype=bool)
        for d in range(k):
            trials[d] += reached.sum()
            hit = reached & (found[:, d] < ranks)
            np.add.at(hits[d], found[hit, d], 1)
            reached = hit
    return AcceptanceTable.from_counts(hits, trials)


def greedy_continuation(model, prompt: list[int], new: int) -> torch.Tensor:
    """``prompt`` and the model's greedy continuation of it (transformers generate)."""
    x = torch.tensor([prompt])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                         do_sample=False, pad_token_id=0)
    return out[0]


def _ranks(model, heads: DecodingHeads, seq: torch.Tensor, start: int) -> np.ndarray:
    """For each root position t >= start: the rank of seq[t + 1 + d] in head d's logits."""
    k = heads.config.num_heads
    hidden = model.model(seq[None]).last_hidden_state[0]  # [L, H]
    t = torch.arange(start, len(seq) - 1 - k)
    rows = hidden[t].expand(k, len(t), hidden.shape[-1])
    embedded = None
    if heads.is_hydra:  # head d reads the token at depth d - 1: seq[t + d]
        table = model.get_input_embeddings().weight
        embedded = torch.stack([table[seq[t + d]] for d in range(1, k + 1)])
    out = model.get_output_embeddings()
    logits = project(heads.states(rows, embedded), out.weight, out.bias)  # [K, M, V]
    target = torch.stack([seq[t + 1 + d] for d in range(1, k + 1)])  # [K, M]
    chosen = logits.gather(-1, target[..., None])
    return (logits > chosen).sum(-1).T.numpy()  # tokens strictly ahead = rank


MEASURED_NODES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def step_seconds(step: StepFunction, dims, max_nodes: int, past: int = 256,
                 repeats: int = 9) -> dict[int, float]:
    """Seconds of one verify step of N = 1..max_nodes nodes over ``past`` slots.

    Measured at a grid of N (the fastest of ``repeats`` calls: the work is deterministic,
    so slower calls only measure interference), then a least-squares line through them:
    a step costs a fixed part plus a part per node, and the line keeps one noisy point on
    a shared machine from choosing the tree.
    """
    rng = np.random.default_rng(0)
    cache = np.zeros((dims.num_layers, 2, 1, dims.num_kv_heads, past, dims.head_dim),
                     dtype=dims.dtype)
    grid = [n for n in MEASURED_NODES if n <= max_nodes]
    times = []
    for n in grid:
        tokens = rng.integers(0, dims.vocab_size, (1, n))
        positions = (past + np.arange(n))[None]
        mask = np.concatenate([np.ones((n, past), bool), np.tril(np.ones((n, n), bool))], 1)
        times.append(_fastest(step, (tokens, positions, cache, mask[None]), repeats))
    slope, intercept = np.polyfit(grid, times, 1) if len(grid) > 1 else (0.0, times[0])
    return {n: float(intercept + slope * n) for n in range(1, max_nodes + 1)}


def _fastest(call, args: tuple, repeats: int) -> float:
    call(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def drafting_seconds(program: StepFunction | None, heads: DecodingHeads, hidden: int,
                     dtype: str) -> list[float]:
    """Drafting cost per step of a tree of depth 1..K: one Medusa call whatever the depth,
    one Hydra call per depth (over that depth's nodes)."""
    k = heads.config.num_heads
    if program is None:
        return [0.0] * k
    if not heads.is_hydra:
        return [_fastest(program, (np.zeros((1, hidden), dtype=dtype),), 15)] * k
    rows = np.zeros((4, hidden), dtype=dtype)
    call = _fastest(program, (rows, np.zeros(4, np.int64), np.zeros(1, np.int64)), 15)
    return [call * depth for depth in range(1, k + 1)]


def auto_tree(table: AcceptanceTable, steps: dict[int, float],
              drafting: list[float]) -> tuple[tuple[tuple[int, ...], ...], TreeChoice, Budget]:
    """The best predicted tree over every depth limit (a shallower tree drafts in fewer
    Hydra calls), with the acceptance table and the winning depth's curve."""
    budgets = [best_budget(AcceptanceTable(table.probs[:depth]), steps, drafting[depth - 1])
               for depth in range(1, len(drafting) + 1)]
    budget = max(budgets, key=lambda b: b.predicted_tokens_per_s)
    choice = TreeChoice(source=AUTO, acceptance=tuple(map(tuple, table.to_json())),
                        curve=budget.curve)
    return budget.paths, choice, budget


# ---------------------------------------------------------------------------- build stages


def check_heads(options: BuildOptions) -> None:
    """The heads' options against the backend and quantization, before anything is built."""
    heads = options.heads
    if options.backend is Backend.TENSORRT:
        raise InputError("decoding heads are not supported on the tensorrt backend yet")
    if options.quantize is not Quantization.NONE and not options.attention.width_invariant:
        raise InputError(f"decoding heads on {options.quantize.value} weights need --attention "
                         "kernel or invariant (without it, verification there does not "
                         "reproduce ar)")
    if heads.count < 1:
        raise InputError(f"--heads must be at least 1 (got {heads.count})")
    if heads.placement is HeadPlacement.STEP and heads.kind is HeadKind.HYDRA:
        raise InputError("Hydra heads read drafted tokens: they need --head-placement program")
    if heads.tree not in (None, AUTO):
        read_tree(Path(heads.tree), heads.count)  # a bad file fails before minutes of work


def _obtain(state: BuildState) -> None:
    """Before the full program, whose pipeline inserts them."""
    options = state.options.heads
    state.on_stage("heads: train" if options.train_text is not None else "heads: load")
    work = state.out / ".train-heads"
    state.heads = obtain_heads(state.source, options, work)
    shutil.rmtree(work, ignore_errors=True)


def _program(state: BuildState) -> None:
    """Lower the ``heads`` program (program placement), save the weights, choose the tree."""
    (heads, report), options = state.heads, state.options.heads
    programs = {}
    if options.placement is HeadPlacement.PROGRAM:
        state.on_stage("capture heads")
        program = capture_heads(heads, state.source.model, state.capture.max_new,
                                state.capture.max_seq, state.draft_vocabulary)
        state.on_stage(f"lower heads ({state.options.backend.value})")
        # Drafting only proposes (verification is exact), so the heads' vocabulary
        # projection may be approximate: int8 on ORT reads a quarter of the bytes of a
        # matrix each call reads in full (0.64 -> 0.39 ms a Hydra call, same top-1 here).
        # Captured onto `--draft-vocab`'s tokens already (its own export: the restricting
        # pass re-exports step programs only).
        lowering = replace(state.lowering, draft_vocabulary=())
        programs["heads"] = lower_program(lowering, program, state.out, "heads",
                                          Compression.DRAFT)
    directory = save_heads(heads, report, state.out / "heads")
    state.on_stage("heads: tree")
    tree, choice = _tree(state, programs.get("heads"))
    info = HeadsInfo(kind=heads.config.kind, num_heads=heads.config.num_heads,
                     num_blocks=heads.config.num_blocks, placement=options.placement,
                     tree=tree, tree_choice=choice, top1=report.top1, top5=report.top5,
                     sha256=file_digests(directory))
    state.update(heads=info, programs=state.manifest.programs | programs)


def _tree(state: BuildState, entry: ProgramEntry | None):
    heads, options, full = state.heads[0], state.options.heads, state.full
    if options.tree is None:
        return default_tree(heads.config.num_heads), TreeChoice(source="default")
    if options.tree != AUTO:
        return read_tree(Path(options.tree), heads.config.num_heads), TreeChoice(
            source=str(options.tree))
    dims = full.result.program.dims
    table = measure_acceptance(state.source.model, heads,
                               calibration_prompts(state.source, options.train_text))
    steps = step_seconds(state.program(full.entry), dims,
                         min(full.result.program.signature.bounds["N"][1], 64))
    program = state.program(entry) if entry else None
    drafting = drafting_seconds(program, heads, dims.hidden_size, dims.dtype)
    paths, choice, _ = auto_tree(table, steps, drafting)
    return paths, choice


HEADS = Stage("heads", lambda o: int(o.heads is not None), _obtain)
HEADS_PROGRAM = Stage(
    "heads program",
    lambda o: 0 if o.heads is None else 1 + 2 * (o.heads.placement is HeadPlacement.PROGRAM),
    _program)
