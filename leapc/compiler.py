"""The compiler driver: model → capture → passes → numeric check → lower → engine directory."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leapc.datastore import DatastoreSource, build_datastore, read_texts
from leapc.early_exit import (
    EXIT_DEPTHS,
    AdapterOptions,
    exit_candidates,
    lower_exit,
    lower_kangaroo,
    move_programs,
    sweep_exits,
    sweep_kangaroo,
)
from leapc.engine_output import check_output, staged_output
from leapc.heads import (
    AUTO,
    HeadsOptions,
    auto_tree,
    calibration_prompts,
    default_tree,
    drafting_seconds,
    measure_acceptance,
    obtain_heads,
    read_tree,
    step_seconds,
)
from leapc.ir.anatomy import recover_anatomy
from leapc.ir.capture import CaptureOptions, StepModule, capture
from leapc.ir.errors import InputError, parse_choice
from leapc.ir.head_spec import HeadKind, HeadPlacement
from leapc.ir.heads import DecodingHeads, capture_heads
from leapc.ir.skip_spec import SkipSet
from leapc.layer_skip import SKIP_DEPTHS, search_path
from leapc.layer_skip import candidates as skip_candidates
from leapc.measure import AR, measure_drafters
from leapc.models.adapter import FILES as ADAPTER_FILES
from leapc.models.heads import HeadsReport, save_heads
from leapc.models.loaders import (
    BUNDLED,
    BUNDLED_DRAFT,
    SourceModel,
    load_source,
    weights_sha256,
)
from leapc.models.train_adapter import trained_adapter
from leapc.passes.insert_decoding_heads import InsertDecodingHeads
from leapc.passes.insert_early_exit import check_exit_layer
from leapc.passes.insert_tree_attention import InsertTreeAttention
from leapc.passes.pipeline import Pipeline, PipelineResult, check_numerics, default_pipeline
from leapc.passes.skip_layers import SkipLayers
from leapc.runtime.backends.base import (
    BACKENDS,
    Attention,
    Compression,
    Device,
    lower_program,
)
from leapc.runtime.drafters.cache_chain import LayerSkipDrafter
from leapc.runtime.engine import DEFAULT_EXIT_DEPTH, DEFAULT_SKIP_DEPTH, load_program
from leapc.runtime.manifest import (
    HEAD_POLICIES,
    AdapterInfo,
    Backend,
    DatastoreInfo,
    ExitChoice,
    HeadsInfo,
    Manifest,
    ModelInfo,
    Policy,
    ProgramEntry,
    Quantization,
    SkipChoice,
    SkipPoint,
    TokenizerInfo,
    TreeChoice,
    sha256_file,
)
from leapc.runtime.sampling import SamplingConfig

DEFAULT_MAX_SEQ = 1024
TOOLCHAIN = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")


def pipeline(attention: Attention, dump_dir: Path | None = None,
             heads: InsertDecodingHeads | None = None) -> Pipeline:
    """The cleanups every engine gets, the heads if any, then the attention lowering."""
    added = (heads,) if heads is not None else ()
    lowering = (InsertTreeAttention(),) if attention is Attention.TREE else ()
    return Pipeline((*default_pipeline().passes, *added, *lowering), dump_dir)


def stage_count(programs: int = 1, backend: str | Backend = Backend.ORT,
                attention: str | Attention | None = None, datastore: bool = False,
                heads: HeadPlacement | None = None, exit_layer: int | str | None = None,
                adapter: bool = False, skip: str | None = None) -> int:
    """Stages reported through ``on_stage``: load, then per program capture, each pass,
    numeric check and lower, then the datastore if any; heads add their training (or
    loading), their pass, the tree, and in program placement their program's capture and
    lowering; an early exit adds the draft's and remainder's lowering (and for ``auto``,
    the candidates' lowering then the sweep), its adapter two (training, measuring); a
    skip set its draft's lowering (``auto``: the search, then the candidates' lowering and
    measurement)."""
    full = len(pipeline(_attention(attention, _backend(backend))).passes)
    draft = len(pipeline(Attention.DENSE).passes)
    added = 0 if heads is None else 3 + 2 * (heads is HeadPlacement.PROGRAM)
    early_exit = 0 if exit_layer is None else 1 + (exit_layer == AUTO) + 2 * adapter
    return (1 + (3 + full) + (programs - 1) * (3 + draft) + datastore + added + early_exit
            + (0 if skip is None else 1 + (skip == AUTO)))


def _toolchain() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in TOOLCHAIN}


def _backend(value: str | Backend) -> Backend:
    return parse_choice(Backend, value, "backend")


def _attention(value: str | Attention | None, backend: Backend) -> Attention:
    if value is None:  # the faster lowering there, by bench/bench_tree_attention.py
        return BACKENDS[backend].default_attention
    return parse_choice(Attention, value, "attention lowering")


def _quantization(value: str | Quantization, backend: Backend) -> Quantization:
    chosen = parse_choice(Quantization, value, "quantization")
    if chosen is Quantization.INT8 and Compression.INT8 not in BACKENDS[backend].compresses:
        able = [b.value for b in Backend if Compression.INT8 in BACKENDS[b].compresses]
        raise InputError(f"--quantize {chosen.value} needs the {' or '.join(able)} backend "
                         f"(got {backend.value})")
    return chosen


def _trained_positions(source: SourceModel) -> int | None:
    """The positions the model was trained for, if its config says."""
    return getattr(source.model.config.get_text_config(), "max_position_embeddings", None)


def _options(source: SourceModel, max_seq: int | None, max_new: int) -> CaptureOptions:
    trained = _trained_positions(source)
    if max_seq is not None and trained is not None and max_seq > trained:
        # Past them the model's outputs are not what it learned (learned position tables
        # have no rows there at all): refused now, not found out after minutes of work.
        raise InputError(f"max-seq {max_seq} exceeds the {trained} positions the model was "
                         "trained for")
    seq = max_seq if max_seq is not None else min(trained or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)
    if seq < 2:
        raise InputError(f"max-seq must be at least 2 (got {seq})")
    if max_new < 1:
        raise InputError(f"max-new must be at least 1 (got {max_new})")
    return CaptureOptions(max_seq=seq, max_new=min(max_new, seq - 1))


@dataclass(frozen=True)
class CompiledProgram:
    """One lowered program of an engine, with what the manifest records about it."""

    source: SourceModel
    result: PipelineResult
    entry: ProgramEntry

    @property
    def info(self) -> ModelInfo:
        dims = self.result.program.dims
        return ModelInfo(
            source=self.source.name, family=self.source.family, num_layers=dims.num_layers,
            num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim,
            hidden_size=dims.hidden_size, vocab_size=dims.vocab_size, dtype=dims.dtype,
            weights_sha256=weights_sha256(self.source.model),
            max_positions=_trained_positions(self.source),
        )


def _compile(source: SourceModel, name: str, options: CaptureOptions, backend: Backend,
             attention: Attention, quantization: Quantization, out: Path, dump_dir: Path | None,
             on_stage, heads: InsertDecodingHeads | None = None) -> CompiledProgram:
    """Capture → passes → numeric check → lower (→ quantize), for one model."""
    on_stage(f"capture {name}")
    captured = capture(source.model, options)
    dump = dump_dir / name if dump_dir else None
    passes = pipeline(attention, dump, heads)
    result = passes(captured, on_pass=lambda p: on_stage(f"{name}: pass {p}"))
    on_stage(f"numeric check {name}")
    check_numerics(StepModule(source.model), result.program)
    on_stage(f"lower {name} ({backend.value})")
    compress = Compression.INT8 if quantization is Quantization.INT8 else Compression.NONE
    entry = lower_program(backend, result.program, out, name, compress)
    return CompiledProgram(source, result, entry)


def _load(model, tokenizer: Path | None) -> SourceModel:
    return model if isinstance(model, SourceModel) else load_source(model, tokenizer)


def build(
    model: str | Path | SourceModel,
    out_dir: str | Path,
    backend: str | Backend = Backend.ORT,
    *,
    attention: str | Attention | None = None,
    max_seq: int | None = None,
    max_new: int = 128,
    tokenizer: Path | None = None,
    draft_model: str | Path | SourceModel | None = None,
    datastore: DatastoreSource | None = None,
    quantize: str | Quantization = Quantization.NONE,
    heads: HeadsOptions | None = None,
    exit_layer: int | str | None = None,
    adapter: AdapterOptions | None = None,
    skip: str | None = None,
    dump_dir: Path | None = None,
    force: bool = False,
    on_stage: Callable[[str], None] = lambda _: None,
) -> Path:
    """Build an engine for ``model`` into ``out_dir``; return ``out_dir``.

    ``model`` (and ``draft_model``, a smaller model with the same vocabulary for the
    ``draft`` policy) is ``"bundled"``, a Hugging Face directory, a llama2.c ``.bin``, or
    an already loaded `SourceModel`. ``datastore`` (for the ``retrieval`` policy) is
    ``"bundled"`` (the bundled model's training corpus) or text files and directories.
    ``quantize="int8"`` (ORT only) stores MatMul weights as int8 (weight-only).
    ``heads`` adds decoding heads (Medusa or Hydra) and their static tree.
    ``exit_layer`` E adds the ``draft`` (layers < E and the exit) and ``remainder`` (layers
    >= E) programs for ``early-exit`` and ``kangaroo``; ``"auto"`` measures every candidate
    exit layer and draft length on the backend and keeps the fastest. ``adapter`` adds
    Kangaroo's adapter at the exit and the ``kangaroo`` policy. ``skip`` (``"2,a5,m7"``:
    whole layers, attention or MLP sublayers; ``"auto"``: searched, then measured) adds the
    skip drafts for ``layer-skip`` and ``swift``.
    ``attention`` is ``"dense"`` or ``"tree"`` (default: the
    faster one on the backend). ``max_new`` bounds N: the prefill chunk and the largest
    tree one step verifies.

    ``out_dir`` must be new, empty, or (with ``force``) an engine to replace: a directory
    holding anything else is refused untouched. The engine is written beside it and swapped
    in whole when complete (`leapc.engine_output`), so a failed or interrupted build leaves
    the previous engine as it was.
    """
    chosen = _backend(backend)
    lowering = _attention(attention, chosen)
    quantization = _quantization(quantize, chosen)
    # Where the backend cannot run here (tensorrt without CUDA), refused before minutes of
    # capture, not after: the build runs its programs as `Engine.load` does on the CPU.
    BACKENDS[chosen].check_device(Device.CPU)
    inputs = _input_paths(model, tokenizer, draft_model, datastore, heads, adapter, dump_dir)
    check_output(out_dir, force, inputs)  # refused before loading anything
    on_stage("load")
    source = _load(model, tokenizer)
    draft = _load(draft_model, None) if draft_model is not None else None
    if draft is not None and draft.model.config.vocab_size != source.model.config.vocab_size:
        raise InputError("the draft model's vocabulary size differs from the model's")
    options = _options(source, max_seq, max_new)
    corpus = read_texts(datastore) if datastore is not None else None  # user errors first
    if heads is not None:
        _check_heads(heads, chosen, quantization)
    layers = source.model.config.get_text_config().num_hidden_layers
    if exit_layer is not None and exit_layer != AUTO:
        if not isinstance(exit_layer, int):
            raise InputError(f"exit layer must be a layer number or 'auto' (got {exit_layer!r})")
        check_exit_layer(exit_layer, layers, "--exit-layer")
    if adapter is not None and exit_layer is None:
        raise InputError("--train-adapter needs --exit-layer (the adapter reads that exit)")
    skip_set = SkipSet.parse(skip, layers) if skip not in (None, AUTO) else skip
    with staged_output(out_dir, force, inputs) as out:
        _write_engine(out, source, draft, options, corpus, heads, exit_layer, adapter,
                      skip_set, chosen, lowering, quantization, dump_dir, on_stage)
    return Path(out_dir)


def _input_paths(model, tokenizer, draft_model, datastore, heads: HeadsOptions | None,
                 adapter: AdapterOptions | None, dump_dir: Path | None) -> list[Path]:
    """Every path the build reads or writes besides the engine: none may lie inside it."""
    named = [model, tokenizer, draft_model, dump_dir, datastore,
             adapter.directory if adapter else None, heads.tree if heads else None,
             heads.train_text if heads else None]
    flat = [p for item in named for p in (item if isinstance(item, (list, tuple)) else [item])]
    return [Path(p) for p in flat
            if isinstance(p, (str, Path)) and p not in (BUNDLED, BUNDLED_DRAFT, AUTO)]


def _write_engine(out: Path, source: SourceModel, draft: SourceModel | None,
                  options: CaptureOptions, corpus, heads: HeadsOptions | None,
                  exit_layer: int | str | None, adapter: AdapterOptions | None,
                  skip_set: SkipSet | str | None, chosen: Backend, lowering: Attention,
                  quantization: Quantization, dump_dir: Path | None, on_stage) -> None:
    """Everything the engine holds, written into the (empty, staging) directory ``out``."""
    trained = _heads(source, heads, out, on_stage) if heads is not None else None
    insert = InsertDecodingHeads(trained[0], heads.placement) if trained else None
    full = _compile(source, "full", options, chosen, lowering, quantization, out, dump_dir,
                    on_stage, insert)
    # The draft model keeps dense attention: its tree drafts put ancestors' KV rows as
    # scratch after the committed ones, so its valid slots are not a prefix, which the tree
    # lowering's compact mask assumes.
    drafter = (_compile(draft, "draft_model", options, chosen, Attention.DENSE, quantization,
                        out, dump_dir, on_stage) if draft is not None else None)
    store = None
    if corpus is not None:
        on_stage("datastore")
        store = build_datastore(*corpus, source.tokenizer, out)
    head_info = None
    if trained is not None:
        head_info = _heads_program(source, trained, heads, full, options, chosen, out, on_stage)
    source.tokenizer.save(str(out / "tokenizer.json"))
    manifest = _manifest(full, drafter, store, head_info, chosen, quantization, options)
    if exit_layer is not None:
        manifest = _with_exit(manifest, full, exit_layer, chosen, options, out, on_stage)
    if adapter is not None:
        manifest = _with_adapter(manifest, full, adapter, chosen, out, on_stage)
    if skip_set is not None:
        manifest = _with_skip(manifest, full, skip_set, chosen, options, out, on_stage)
    manifest.write(out)


def _with_exit(manifest: Manifest, full: CompiledProgram, exit_layer: int | str,
               backend: Backend, options: CaptureOptions, out: Path, on_stage) -> Manifest:
    """Add the early-exit ``draft`` and ``remainder`` programs at ``exit_layer`` (or at the
    fastest point of the measured sweep, for ``"auto"``) and the policies that use them."""
    program = full.result.program
    if exit_layer == AUTO:
        exit_layer, entries, choice = _sweep_exit(full, backend, options, out, on_stage)
    else:
        on_stage(f"lower draft and remainder, exit at layer {exit_layer} ({backend.value})")
        entries = lower_exit(program, exit_layer, backend, out)
        choice = ExitChoice(source="given", depth=DEFAULT_EXIT_DEPTH)
    drafting = manifest.quantization is Quantization.NONE  # int8 engines: ar only (see above)
    policies = manifest.policies + ((Policy.EARLY_EXIT,) if drafting else ())
    return manifest.model_copy(update={"programs": manifest.programs | entries,
                                       "exit_layer": exit_layer, "exit_choice": choice,
                                       "policies": policies})


def _with_adapter(manifest: Manifest, full: CompiledProgram, options: AdapterOptions,
                  backend: Backend, out: Path, on_stage) -> Manifest:
    """Kangaroo: the adapter at the engine's exit (trained, or read from its directory),
    the ``kangaroo`` program, and a copy of the adapter's files in the engine."""
    program, layer = full.result.program, manifest.exit_layer
    on_stage(f"kangaroo adapter at layer {layer}")
    adapter, report = trained_adapter(full.source, program, layer, options.directory,
                                      options.training)
    entry = lower_kangaroo(program, layer, adapter, backend, out)
    on_stage("kangaroo: measure draft lengths x stops")
    step, kangaroo, remainder = (load_program(backend, out / e.file, _outputs(e))
                                 for e in (full.entry, entry, manifest.programs["remainder"]))
    ar, sweep = sweep_kangaroo(step, kangaroo, remainder, layer, program.dims,
                               calibration_prompts(full.source, None), manifest.max_seq,
                               manifest.max_new)
    best = max(sweep, key=lambda p: p.tokens_per_s)
    info = AdapterInfo(steps=report.steps, seconds=report.seconds,
                       agreement_before=report.agreement_before,
                       agreement_after=report.agreement_after, depth=best.depth,
                       confidence=best.confidence, ar_tokens_per_s=ar, sweep=sweep,
                       sha256=_digests(_copy_adapter(options.directory, out / "adapter")))
    drafting = manifest.quantization is Quantization.NONE  # int8 engines: ar only (see above)
    return manifest.model_copy(update={
        "programs": manifest.programs | {"kangaroo": entry}, "adapter": info,
        "policies": manifest.policies + ((Policy.KANGAROO,) if drafting else ())})


def _copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ADAPTER_FILES:
        shutil.copyfile(source / name, target / name)
    return target


def _digests(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every file in ``directory`` (trained weights kept in an engine)."""
    return {f.name: sha256_file(f) for f in sorted(directory.iterdir())}


def _with_skip(manifest: Manifest, full: CompiledProgram, skip: SkipSet | str,
               backend: Backend, options: CaptureOptions, out: Path, on_stage) -> Manifest:
    """Add the skip drafts (program ``skip_<i>`` bypasses ``candidates[i]``: the given set,
    or every set `--skip auto` measured, the fastest being ``skip``) and the ``layer-skip``
    and ``swift`` policies."""
    if skip == AUTO:
        skip, sets, entries, choice = _search_skip(full, backend, options, out, on_stage)
    else:
        on_stage(f"lower skip draft, skipping {skip} ({backend.value})")
        sets, entries = [skip], [_lower_skip(full.result.program, skip, 0, backend, out)]
        choice = SkipChoice(source="given", depth=DEFAULT_SKIP_DEPTH)
    choice = choice.model_copy(update={"candidates": tuple(map(str, sets))})
    drafting = manifest.quantization is Quantization.NONE  # int8 engines: ar only (see above)
    return manifest.model_copy(update={
        "programs": manifest.programs | {f"skip_{i}": e for i, e in enumerate(entries)},
        "skip": str(skip), "skip_choice": choice,
        "policies": manifest.policies + ((Policy.LAYER_SKIP, Policy.SWIFT) if drafting else ())})


def _lower_skip(program, skip: SkipSet, index: int, backend: Backend,
                out: Path) -> ProgramEntry:
    sliced = SkipLayers(skip)(program).program
    # The draft only proposes and its rows are scratch: all of it may be approximate.
    return lower_program(backend, sliced, out, f"skip_{index}", Compression.DRAFT)


def _search_skip(full: CompiledProgram, backend: Backend, options: CaptureOptions, out: Path,
                 on_stage) -> tuple[SkipSet, list[SkipSet], list[ProgramEntry], SkipChoice]:
    program, dims = full.result.program, full.result.program.dims
    on_stage("skip search: greedy agreement path")
    prompts = calibration_prompts(full.source, None)
    path = search_path(full.source.model, prompts)
    sets = skip_candidates(path, dims.num_layers)
    on_stage(f"skip search: lower and measure {len(sets)} sets ({backend.value})")
    entries = [_lower_skip(program, skip, i, backend, out) for i, skip in enumerate(sets)]
    steps = [load_program(backend, out / e.file, _outputs(e)) for e in entries]

    def drafter(i: int, depth: int):
        return lambda kv: LayerSkipDrafter(steps[i], kv, dims.num_layers, SamplingConfig(),
                                           np.random.default_rng(0), depth)

    step = load_program(backend, out / full.entry.file, _outputs(full.entry))
    measured = measure_drafters(step, dims, {(i, d): drafter(i, d) for i in range(len(sets))
                                             for d in SKIP_DEPTHS},
                                prompts, options.max_seq, options.max_new)
    ar = measured.pop(AR)[0]
    (best, depth), _ = max(measured.items(), key=lambda item: item[1][0])
    choice = SkipChoice(source="auto", depth=depth, ar_tokens_per_s=ar,
                        path=tuple((str(s), round(a, 4)) for s, a in path),
                        points=tuple(SkipPoint(skip=str(sets[i]), depth=d, tokens_per_s=tps,
                                               tau=tau)
                                     for (i, d), (tps, tau) in measured.items()))
    return sets[best], sets, entries, choice


def _sweep_exit(full: CompiledProgram, backend: Backend, options: CaptureOptions, out: Path,
                on_stage) -> tuple[int, dict[str, ProgramEntry], ExitChoice]:
    program, dims = full.result.program, full.result.program.dims
    layers = exit_candidates(dims.num_layers)
    on_stage(f"lower exits at layers {layers.start}..{layers.stop - 1} ({backend.value})")
    work = out / ".exit-sweep"
    lowered = {}
    for layer in layers:
        (work / str(layer)).mkdir(parents=True)
        lowered[layer] = lower_exit(program, layer, backend, work / str(layer))
    on_stage(f"exit sweep: {len(layers)} layers x {len(EXIT_DEPTHS)} draft lengths")
    programs = {layer: tuple(load_program(backend, work / str(layer) / entries[name].file,
                                          _outputs(entries[name]))
                             for name in ("draft", "remainder"))
                for layer, entries in lowered.items()}
    step = load_program(backend, out / full.entry.file, _outputs(full.entry))
    prompts = calibration_prompts(full.source, None)
    ar, points = sweep_exits(step, programs, dims, prompts, options.max_seq, options.max_new)
    best = max(points, key=lambda p: p.tokens_per_s)
    move_programs(lowered[best.layer], work / str(best.layer), out)
    shutil.rmtree(work)
    choice = ExitChoice(source="auto", depth=best.depth, ar_tokens_per_s=ar, sweep=points)
    return best.layer, lowered[best.layer], choice


def _check_heads(heads: HeadsOptions, backend: Backend, quantization: Quantization) -> None:
    if backend is Backend.TENSORRT:
        raise InputError("decoding heads are not supported on the tensorrt backend yet")
    if quantization is not Quantization.NONE:
        raise InputError("decoding heads need float weights (int8 engines decode with ar only)")
    if heads.count < 1:
        raise InputError(f"--heads must be at least 1 (got {heads.count})")
    if heads.placement is HeadPlacement.STEP and heads.kind is HeadKind.HYDRA:
        raise InputError("Hydra heads read drafted tokens: they need --head-placement program")
    if heads.tree not in (None, AUTO):
        read_tree(Path(heads.tree), heads.count)  # a bad file fails before minutes of work


def _heads(source: SourceModel, heads: HeadsOptions, out: Path,
           on_stage) -> tuple[DecodingHeads, HeadsReport]:
    on_stage("heads: train" if heads.train_text is not None else "heads: load")
    work = out / ".train-heads"
    trained = obtain_heads(source, heads, work)
    shutil.rmtree(work, ignore_errors=True)
    return trained


def _heads_program(source: SourceModel, trained: tuple[DecodingHeads, HeadsReport],
                   options: HeadsOptions, full: CompiledProgram, capture_options: CaptureOptions,
                   backend: Backend, out: Path, on_stage) -> tuple[HeadsInfo, ProgramEntry | None]:
    """Lower the ``heads`` program (program placement), save the weights, choose the tree."""
    heads, report = trained
    entry = None
    if options.placement is HeadPlacement.PROGRAM:
        on_stage("capture heads")
        program = capture_heads(heads, source.model, capture_options.max_new,
                                capture_options.max_seq)
        on_stage(f"lower heads ({backend.value})")
        # Drafting only proposes (verification is exact), so the heads' vocabulary
        # projection may be approximate: int8 on ORT reads a quarter of the bytes of a
        # matrix each call reads in full (0.64 -> 0.39 ms a Hydra call, same top-1 here).
        entry = lower_program(backend, program, out, "heads", Compression.DRAFT)
    directory = save_heads(heads, report, out / "heads")
    on_stage("heads: tree")
    tree, choice = _tree(source, heads, options, full, entry, backend, out)
    info = HeadsInfo(kind=heads.config.kind, num_heads=heads.config.num_heads,
                     num_blocks=heads.config.num_blocks, placement=options.placement,
                     tree=tree, tree_choice=choice, top1=report.top1, top5=report.top5,
                     sha256=_digests(directory))
    return info, entry


def _tree(source: SourceModel, heads: DecodingHeads, options: HeadsOptions,
          full: CompiledProgram, entry: ProgramEntry | None, backend: Backend, out: Path):
    if options.tree is None:
        return default_tree(heads.config.num_heads), TreeChoice(source="default")
    if options.tree != AUTO:
        return read_tree(Path(options.tree), heads.config.num_heads), TreeChoice(
            source=str(options.tree))
    dims = full.result.program.dims
    table = measure_acceptance(source.model, heads, calibration_prompts(source,
                                                                       options.train_text))
    step = load_program(backend, out / full.entry.file, _outputs(full.entry))
    steps = step_seconds(step, dims, min(full.result.program.signature.bounds["N"][1], 64))
    program = load_program(backend, out / entry.file, _outputs(entry)) \
        if entry else None
    drafting = drafting_seconds(program, heads, dims.hidden_size, dims.dtype)
    paths, choice, _ = auto_tree(table, steps, drafting)
    return paths, choice


def _outputs(entry: ProgramEntry) -> tuple[str, ...]:
    return tuple(o["name"] for o in entry.signature["outputs"])


def _tokenizer_info(source: SourceModel) -> TokenizerInfo:
    tokenizer = source.tokenizer
    # The digest of the bytes `Tokenizer.save` writes beside the manifest (the same pretty
    # JSON); the one setting those bytes lack is recorded beside it.
    digest = hashlib.sha256(tokenizer.to_str(pretty=True).encode()).hexdigest()
    return TokenizerInfo(sha256=digest, bos_id=source.bos_id, eos_ids=source.eos_ids,
                         encode_special_tokens=tokenizer.encode_special_tokens)


def _manifest(full: CompiledProgram, draft: CompiledProgram | None,
              datastore: DatastoreInfo | None,
              heads: tuple[HeadsInfo, ProgramEntry | None] | None, backend: Backend,
              quantization: Quantization, options: CaptureOptions) -> Manifest:
    dims = full.result.program.dims
    programs = {"full": full.entry} | ({"draft_model": draft.entry} if draft else {})
    if heads is not None and heads[1] is not None:
        programs["heads"] = heads[1]
    policies = (Policy.AR, Policy.LOOKUP, Policy.RECYCLE, Policy.LOOKAHEAD) + (
        (Policy.DRAFT,) if draft else ()) + ((Policy.RETRIEVAL,) if datastore else ()) + (
        HEAD_POLICIES[heads[0].kind] if heads else ())
    if quantization is Quantization.INT8:
        # ORT's int8 MatMulNBits gives a token's logits differently (by up to ~0.02 on
        # stories260K) in a one-token step and in a wider verify step, so drafting policies
        # would not reproduce `ar`: int8 engines decode autoregressively only.
        policies = (Policy.AR,)
    return Manifest(
        leapc_version=importlib.metadata.version("leapc"),
        toolchain=_toolchain(),
        backend=backend,
        model=full.info,
        draft_model=draft.info if draft else None,
        datastore=datastore,
        heads=heads[0] if heads else None,
        quantization=quantization,
        tokenizer=_tokenizer_info(full.source),
        programs=programs,
        passes=full.result.ran,
        anatomy=tuple(recover_anatomy(full.result.program.program, dims.num_layers,
                                      dims.hidden_size).describe()),
        policies=policies,
        max_seq=options.max_seq,
        max_batch=options.max_batch,
        max_new=options.max_new,
    )
