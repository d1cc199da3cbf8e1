"""``leapc inspect``: what an engine (or a model, captured on the fly) is made of."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from leapc.ir.errors import EngineError
from leapc.ir.signature import B, S, StepSignature
from leapc.runtime.backends.ort_shared_weights import INDEX_FILE, WEIGHTS_FILE, WeightsIndex
from leapc.runtime.manifest import (
    MANIFEST_FILE,
    AdapterInfo,
    HeadsInfo,
    Manifest,
    ProgramEntry,
    TunedRun,
    Tuning,
    read_manifest,
)
from leapc.runtime.policies import Policy


def _kv_row(signature: StepSignature, itemsize: int, max_seq: int) -> str:
    formula = signature.kv_bytes(itemsize)
    at_max = formula.subs({B: 1, S: max_seq})
    return f"{formula}  (B=1, S={max_seq}: {int(at_max) / 2**20:.1f} MiB)"


def _signature_table(name: str, signature: StepSignature, itemsize: int) -> Table:
    table = Table(title=f"step signature · {name}")
    for column in ("tensor", "dtype", "shape"):
        table.add_column(column)
    for kind, specs in (("in", signature.inputs), ("out", signature.outputs)):
        for spec in specs:
            shape = "[" + ", ".join(str(d) for d in spec.shape) + "]"
            table.add_row(f"{kind} {spec.name}", spec.dtype, shape)
    bounds = ", ".join(f"{lo} ≤ {k} ≤ {hi}" for k, (lo, hi) in signature.bounds.items())
    has_cache = any(spec.name == "past" for spec in signature.inputs)
    table.add_row("bounds", "", f"{bounds}, T + N ≤ {signature.max_seq}" if has_cache else bounds)
    if has_cache:
        table.add_row("KV bytes", "", _kv_row(signature, itemsize, signature.max_seq))
    return table


def _program_table(name: str, entry: ProgramEntry, itemsize: int) -> Table:
    """A program's signature table; a signature it cannot be read from is a broken engine."""
    try:
        return _signature_table(name, StepSignature.from_json(entry.signature), itemsize)
    except (ValueError, TypeError, KeyError) as err:  # sympy's errors are ValueErrors
        reason = " ".join(str(err).split())  # sympy's messages span lines; errors are one
        raise EngineError(f"program {name!r}: the manifest's step signature cannot be read "
                          f"({reason})") from None


def byte_size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit it reaches, one decimal."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _files_table(path: Path, m: Manifest) -> Table:
    """Each program's own files on disk and, where the programs read one copy of their
    weights (`ort_shared_weights`), how much each reads from it and how much of that
    another program reads too: what a draft program adds to the engine."""
    index = (WeightsIndex.model_validate_json((path / INDEX_FILE).read_text())
             if (path / INDEX_FILE).is_file() else None)
    read = {name: set(tensors.values()) for name, tensors in (index.programs if index else {}).items()}
    table = Table(title="files")
    for column in ("program", "own files", "own bytes", "shared weights", "of them another's"):
        table.add_column(column)
    for name, entry in m.programs.items():
        own = [entry.file, *(f for f in entry.data_files if f not in (WEIGHTS_FILE, INDEX_FILE))]
        mine = read.get(entry.file, set())
        others = set().union(*(v for k, v in read.items() if k != entry.file))
        shared = (byte_size(sum(s.nbytes for s in mine)),
                  byte_size(sum(s.nbytes for s in mine & others)))
        table.add_row(name, ", ".join(own), byte_size(sum((path / f).stat().st_size for f in own)),
                      *(shared if mine else ("—", "—")))
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    table.add_row("engine", "the whole directory", byte_size(on_disk),
                  byte_size((path / WEIGHTS_FILE).stat().st_size) if index else "—", "")
    return table


def _vs(tokens_per_s: float, ar_tokens_per_s: float | None) -> str:
    """Speed against ``ar``, or a dash where the manifest recorded no ``ar`` speed."""
    return f"{tokens_per_s / ar_tokens_per_s:.2f}×" if ar_tokens_per_s else "—"


def _heads_table(heads: HeadsInfo) -> Table:
    """The heads, their held-out agreement, the static tree and what it was chosen from."""
    table = Table(title=f"decoding heads · {heads.num_heads} × {heads.kind.value} "
                        f"({heads.num_blocks} blocks, {heads.placement.value} placement)")
    for column in ("depth", "top-1 agreement", "top-5 agreement", "tree nodes",
                   "measured acceptance (rank 0 / any of 8)"):
        table.add_column(column, justify="right")
    depths = np.asarray([len(p) for p in heads.tree], dtype=int)
    acceptance = heads.tree_choice.acceptance
    for d in range(heads.num_heads):
        measured = (f"{acceptance[d][0]:.2f} / {sum(acceptance[d]):.2f}"
                    if d < len(acceptance) else "—")
        table.add_row(str(d + 1), f"{heads.top1[d]:.3f}", f"{heads.top5[d]:.3f}",
                      str(int((depths == d + 1).sum())), measured)
    chosen = f"{len(heads.tree)} nodes, chosen by {heads.tree_choice.source}"
    if heads.tree_choice.curve:
        best = max(heads.tree_choice.curve, key=lambda row: row[2])
        chosen += f" (predicted tau {best[1]:.2f}, {best[2]:.0f} tok/s)"
    table.caption = f"static tree: {chosen}"
    return table


def _measured(title: str, *columns: str) -> Table:
    """A table of measured configurations: numbers, right-justified."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    return table


def _exit_table(manifest: Manifest) -> Table:
    """The early exit, and the sweep `--exit-layer auto` chose it from (fastest first)."""
    choice = manifest.exit_choice
    table = _measured(f"early exit · layer {manifest.exit_layer} of "
                      f"{manifest.model.dims.num_layers}, draft length {choice.depth} "
                      f"({choice.source})", "exit layer", "draft length", "tau", "tokens/s",
                      "vs ar")
    for point in sorted(choice.sweep, key=lambda p: -p.tokens_per_s):
        table.add_row(str(point.layer), str(point.depth), f"{point.tau:.2f}",
                      f"{point.tokens_per_s:.1f}", _vs(point.tokens_per_s, choice.ar_tokens_per_s))
    if choice.ar_tokens_per_s:
        table.caption = (f"greedy, calibration prompts, this build's machine; ar "
                         f"{choice.ar_tokens_per_s:.1f} tokens/s in the same run")
    return table


def _adapter_line(adapter: AdapterInfo) -> str:
    return (f"{adapter.steps} steps in {adapter.seconds:.0f} s; held-out exit agreement "
            f"{adapter.agreement_before:.3f} -> {adapter.agreement_after:.3f}")


def _kangaroo_table(adapter: AdapterInfo) -> Table:
    """Kangaroo's measured draft lengths x stops (fastest first)."""
    table = Table(title=f"kangaroo · draft length {adapter.depth}, stop below "
                        f"{adapter.confidence} (auto)",
                  caption=f"greedy, calibration prompts, this build's machine; ar "
                          f"{adapter.ar_tokens_per_s:.1f} tokens/s in the same run")
    for column in ("draft length", "stop below", "tau", "tokens/s", "vs ar"):
        table.add_column(column, justify="right")
    for point in sorted(adapter.sweep, key=lambda p: -p.tokens_per_s):
        table.add_row(str(point.depth), str(point.confidence), f"{point.tau:.2f}",
                      f"{point.tokens_per_s:.1f}", _vs(point.tokens_per_s, adapter.ar_tokens_per_s))
    return table


def _skip_table(manifest: Manifest) -> Table:
    """The layer-skip draft, and the measured sets `--skip auto` chose it from."""
    choice = manifest.skip_choice
    table = _measured(f"layer skip · bypassing {manifest.skip}, draft length {choice.depth} "
                      f"({choice.source})", "skip set", "draft length", "tau", "tokens/s",
                      "vs ar")
    for point in sorted(choice.points, key=lambda p: -p.tokens_per_s):
        table.add_row(point.skip, str(point.depth), f"{point.tau:.2f}",
                      f"{point.tokens_per_s:.1f}", _vs(point.tokens_per_s, choice.ar_tokens_per_s))
    if choice.path:
        path = ", ".join(f"{len(choice.path[: i + 1])}: {a:.3f}" for i, (_, a) in enumerate(choice.path))
        table.caption = (f"ar {choice.ar_tokens_per_s:.1f} tokens/s in the same run; argmax "
                         f"agreement along the greedy path (sublayers skipped: agreement) {path}")
    return table


def _tuning_table(tuning: Tuning) -> Table:
    """What `build --tune` measured, fastest first; ``--policy auto`` runs the marked row."""
    chosen = tuning.chosen
    table = _measured(f"tuning · auto runs {_tuned_label(chosen)} ({tuning.prompts} prompts "
                      f"× {tuning.max_new_tokens} tokens, median of {tuning.repeats}, "
                      f"{tuning.threads} threads)", "policy", "tokens/s", "tau", "vs ar",
                      "identical to ar")
    ar = next(run.tokens_per_s for run in tuning.table if run.policy is Policy.AR)
    for run in sorted(tuning.table, key=lambda r: -r.tokens_per_s):
        mark = " ←" if run == chosen else ""
        table.add_row(_tuned_label(run) + mark, f"{run.tokens_per_s:.1f}", f"{run.tau:.2f}",
                      _vs(run.tokens_per_s, ar), "yes" if run.identical_to_ar else "NO")
    return table


def _tuned_label(run: TunedRun) -> str:
    return run.policy.value + (f" (max-draft {run.max_draft})" if run.max_draft else "")


def _anatomy_table(rows) -> Table:
    table = Table(title="anatomy")
    table.add_column("landmark")
    table.add_column("graph node")
    for landmark, node in rows:
        table.add_row(landmark, node)
    return table


def _decoding_line(m) -> str:
    d = m.model.diffusion
    if d is None:
        return "autoregressive"
    return (f"block diffusion: blocks of {d.block_size}, mask id {d.mask_token_id}, logits "
            f"{'shifted by one' if d.logits_shift else 'not shifted'}")


def inspect_engine(path: Path) -> list[Table]:
    """The engine's tables, after the same whole-engine validation as `leapc.load` (every
    file hashed): a broken engine is an `EngineError`, never a report."""
    m = read_manifest(path)
    itemsize = np.dtype(m.model.dims.dtype).itemsize
    summary = Table(title=f"engine {path}", show_header=False)
    for key, value in (
        ("model", f"{m.model.source} ({m.model.family}, {m.model.dims.num_layers} layers, "
                  f"vocab {m.model.dims.vocab_size}, {m.model.dims.dtype})"),
        ("decoding", _decoding_line(m)),
        ("backend", m.backend.value),
        ("passes", " → ".join(m.passes) or "none"),
        ("policies", ", ".join(p.value for p in m.policies)),
        ("quantization", m.quantization.value),
        ("attention", m.attention.value if m.attention else "not recorded"),
        ("draft vocabulary", f"{m.draft_vocabulary} of {m.model.dims.vocab_size} tokens"
                             if m.draft_vocabulary else "every token"),
        ("datastore", f"{m.datastore.tokens:,} tokens in {m.datastore.documents:,} documents "
                      f"({m.datastore.source})" if m.datastore else "none"),
        ("kangaroo adapter", _adapter_line(m.adapter) if m.adapter else "none"),
        ("weights sha256", m.model.weights_sha256[:16] + "…"),
        ("toolchain", ", ".join(f"{k} {v}" for k, v in m.toolchain.items())),
    ):
        summary.add_row(key, value)
    tables = [summary, _anatomy_table(m.anatomy)] + ([_heads_table(m.heads)] if m.heads else [])
    if m.exit_choice is not None:
        tables.append(_exit_table(m))
    if m.adapter is not None:
        tables.append(_kangaroo_table(m.adapter))
    if m.skip_choice is not None:
        tables.append(_skip_table(m))
    if m.tuning is not None:
        tables.append(_tuning_table(m.tuning))
    tables += [_program_table(name, entry, itemsize) for name, entry in m.programs.items()]
    return [*tables, _files_table(path, m)]


def inspect_model(spec: str) -> list[Table]:
    """Capture a model (no passes, no lowering) and show what an engine of it would hold."""
    import torch

    from leapc.ir.anatomy import recover_anatomy
    from leapc.ir.capture import CaptureOptions, capture
    from leapc.models.loaders import load_source

    source = load_source(spec)
    captured = capture(source.model, CaptureOptions())
    dims = captured.dims
    anatomy = recover_anatomy(captured.program, dims.num_layers, dims.hidden_size)
    itemsize = torch.empty((), dtype=getattr(torch, dims.dtype)).element_size()
    return [_anatomy_table(anatomy.describe()),
            _signature_table("full", captured.signature, itemsize)]


def inspect_target(path: Path) -> list[Table]:
    if (path / MANIFEST_FILE).exists() or (path.is_dir() and not (path / "config.json").exists()):
        return inspect_engine(path)
    return inspect_model(str(path))
