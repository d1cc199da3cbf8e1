"""The compiler driver: model → capture → passes → numeric check → lower → engine directory.

A build is one ordered list of stages (`STAGES`), each beside its feature; this module
holds the driver, the stages every engine has (load, full program, draft model) and the
manifest's base.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from leapc.datastore import DATASTORE, read_texts
from leapc.draft_vocabulary import frequent_tokens
from leapc.early_exit import ADAPTER, EXIT
from leapc.engine_output import check_output, staged_output
from leapc.heads import HEADS, HEADS_PROGRAM, check_heads
from leapc.ir.anatomy import recover_anatomy
from leapc.ir.capture import CaptureOptions, MaskLayout, StepModule, capture
from leapc.ir.early_exit import check_exit_layer
from leapc.ir.errors import InputError
from leapc.ir.skip_spec import SkipSet
from leapc.layer_skip import SKIP
from leapc.models.loaders import BUNDLED, BUNDLED_DIFFUSION, BUNDLED_DRAFT, SourceModel, load_source
from leapc.passes.insert_decoding_heads import InsertDecodingHeads
from leapc.passes.insert_tree_attention import InsertTreeAttention, Windows
from leapc.passes.pipeline import Pipeline, check_numerics, default_pipeline
from leapc.passes.unroll_draft_chain import UnrollDraftChain
from leapc.runtime.backends.base import BACKENDS, Compression, Device, lower_program
from leapc.runtime.manifest import Attention, Manifest, ProgramEntry, TokenizerInfo, sha256_file
from leapc.runtime.policies import DEFAULT_MAX_DRAFT, POLICIES, Policy, offered_policies
from leapc.runtime.step import unrolled
from leapc.stage import AUTO, BuildOptions, BuildState, CompiledProgram, Stage
from leapc.tune import tune

DEFAULT_MAX_SEQ = 1024
TOOLCHAIN = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")


def pipeline(attention: Attention, dump_dir: Path | None = None,
             heads: InsertDecodingHeads | None = None) -> Pipeline:
    """The cleanups every engine gets, the heads if any, then the attention lowering."""
    added = (heads,) if heads is not None else ()
    # Width-invariant lowerings need every layer in tree attention, windowed ones included;
    # the others keep a window's dense SDPA (the AOTInductor/Triton path has no window).
    windows = Windows.TREE if attention.width_invariant else Windows.DENSE
    lowering = (InsertTreeAttention(windows),) if attention.compact_mask else ()
    return Pipeline((*default_pipeline().passes, *added, *lowering), dump_dir)


def build(model: str | Path | SourceModel, out_dir: str | Path,
          options: BuildOptions = BuildOptions(), *, force: bool = False,
          on_stage: Callable[[str], None] = lambda _: None) -> Path:
    """Build an engine for ``model`` into ``out_dir``; return ``out_dir``.

    ``model`` (and ``options.draft_model``) is ``"bundled"``, a Hugging Face directory, a
    llama2.c ``.bin``, or an already loaded `SourceModel`. ``on_stage`` hears each of the
    `planned_steps` progress steps as it starts.

    ``out_dir`` must be new, empty, or (with ``force``) an engine to replace: a directory
    holding anything else is refused untouched. The engine is written beside it and swapped
    in whole when complete (`leapc.engine_output`), so a failed or interrupted build leaves
    the previous engine as it was.
    """
    # Where the backend cannot run here (tensorrt without CUDA), refused before minutes of
    # capture, not after: the build runs its programs as `Engine.load` does on the CPU.
    BACKENDS[options.backend].check_device(Device.CPU)
    inputs = _input_paths(model, options)
    check_output(out_dir, force, inputs)  # refused before loading anything
    state = BuildState(options, on_stage)
    _load(state, model)  # every input read and checked: a mistake leaves no trace
    with staged_output(out_dir, force, inputs) as out:
        state.out = out
        for stage in STAGES:
            if stage.steps(options):
                stage.run(state)
        _with_policies(state.manifest).write(out)
        if options.tune_prompts is not None:  # the whole engine, measured before it is swapped in
            on_stage("tune")
            tune(out, options.tune_prompts)
    return Path(out_dir)


def planned_steps(options: BuildOptions) -> int:
    """The progress steps a build with ``options`` reports: its stages' sum."""
    tuning = int(options.tune_prompts is not None)
    return LOAD_STEPS + sum(stage.steps(options) for stage in STAGES) + tuning


def _input_paths(model, options: BuildOptions) -> list[Path]:
    """Every path the build reads or writes besides the engine: none may lie inside it."""
    heads, adapter = options.heads, options.adapter
    named = [model, options.tokenizer, options.draft_model, options.dump_dir, options.datastore,
             adapter.directory if adapter else None, heads.tree if heads else None,
             heads.train_text if heads else None]
    flat = [p for item in named for p in (item if isinstance(item, (list, tuple)) else [item])]
    return [Path(p) for p in flat
            if isinstance(p, (str, Path)) and p not in (BUNDLED, BUNDLED_DRAFT, BUNDLED_DIFFUSION, AUTO)]


# ------------------------------------------------------------------ load (before any output)

LOAD_STEPS = 1


def _load(state: BuildState, model) -> None:
    """Read the model, draft model and datastore text, and check every option that needs
    them."""
    options = state.options
    state.on_stage("load")
    state.source = _source(model, options.tokenizer)
    if options.draft_model is not None:
        state.draft = _source(options.draft_model, None)
        if state.draft.model.config.vocab_size != state.source.model.config.vocab_size:
            raise InputError("the draft model's vocabulary size differs from the model's")
    state.capture = _capture_options(state.source, options.max_seq, options.max_new,
                                     options.max_batch)
    if options.datastore is not None:
        state.corpus = read_texts(options.datastore)
    if state.source.block_diffusion is not None:
        _check_diffusion_options(options)
    if options.heads is not None:
        check_heads(options)
    layers = state.source.model.config.get_text_config().num_hidden_layers
    if options.exit_layer not in (None, AUTO):
        check_exit_layer(options.exit_layer, layers, "--exit-layer")
    if options.adapter is not None and options.exit_layer is None:
        raise InputError("--train-adapter needs --exit-layer (the adapter reads that exit)")
    if isinstance(options.skip, str) and options.skip != AUTO:
        state.options = replace(options, skip=SkipSet.parse(options.skip, layers))
    if options.draft_vocab is not None:
        if not (options.exit_layer or options.skip or options.heads):
            raise InputError("--draft-vocab restricts draft programs: it needs --exit-layer, "
                             "--skip or --heads")
        vocab_size = state.source.model.config.get_text_config().vocab_size
        state.draft_vocabulary = frequent_tokens(state.source.tokenizer, options.draft_vocab,
                                                 vocab_size, state.source.eos_ids)


def _check_diffusion_options(options: BuildOptions) -> None:
    """A block-diffusion model unmasks blocks (runtime/diffusion.py): what only next-token
    drafting reads is refused, by name."""
    given = [flag for flag, value in (
        ("--draft-model", options.draft_model), ("--datastore", options.datastore),
        ("--heads", options.heads), ("--exit-layer", options.exit_layer),
        ("--skip", options.skip), ("--tune", options.tune_prompts)) if value is not None]
    if given:
        unmasking = ", ".join(p.value for p in Policy if POLICIES[p].unmasking is not None)
        raise InputError(f"{', '.join(given)}: for autoregressive models (this is a "
                         f"block-diffusion model; its policies are {unmasking})")


def _source(model, tokenizer: Path | None) -> SourceModel:
    return model if isinstance(model, SourceModel) else load_source(model, tokenizer)


def _capture_options(source: SourceModel, max_seq: int | None, max_new: int,
                     max_batch: int) -> CaptureOptions:
    trained = source.trained_positions
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
    if max_batch < 1:
        raise InputError(f"max-batch must be at least 1 (got {max_batch})")
    return CaptureOptions(max_seq=seq, max_batch=max_batch, max_new=min(max_new, seq - 1))


# ------------------------------------------------------------------ programs


def _compile(state: BuildState, source: SourceModel, name: str, attention: Attention,
             heads: InsertDecodingHeads | None = None) -> CompiledProgram:
    """Capture → passes → numeric check → lower (→ quantize), for one model."""
    options, on_stage = state.options, state.on_stage
    on_stage(f"capture {name}")
    captured = capture(source.model, state.capture)
    dump = options.dump_dir / name if options.dump_dir else None
    result = pipeline(attention, dump, heads)(captured,
                                              on_pass=lambda p: on_stage(f"{name}: pass {p}"))
    on_stage(f"numeric check {name}")
    layout = MaskLayout.of(source.model, state.capture)  # the windows the capture gave it
    check_numerics(StepModule(source.model, layout), result.program)
    on_stage(f"lower {name} ({options.backend.value})")
    entry = lower_program(options.lowering, result.program, state.out, name, Compression.NONE)
    return CompiledProgram(source, result, entry)


def _program_steps(attention: Attention, heads: bool = False) -> int:
    """capture, each pass, numeric check, lower"""
    return 3 + len(pipeline(attention).passes) + heads


def _full_steps(options: BuildOptions) -> int:
    return _program_steps(options.attention, heads=options.heads is not None)


def _full(state: BuildState) -> None:
    """The target's step program (with the heads' pass, if any), the tokenizer and the
    manifest's base (policy ``ar``)."""
    heads = state.heads
    insert = (InsertDecodingHeads(heads[0], state.options.heads.placement)
              if heads is not None else None)
    state.full = full = _compile(state, state.source, "full", state.options.attention, insert)
    state.source.tokenizer.save(str(state.out / "tokenizer.json"))
    state.manifest = _manifest(full, state.options, state.capture)
    if state.draft_vocabulary:  # what every draft program is lowered with (state.lowering)
        state.update(draft_vocabulary=len(state.draft_vocabulary))


def _draft_model(state: BuildState) -> None:
    """The draft model's step, and with ``draft_chain`` its greedy chain of
    `DEFAULT_MAX_DRAFT` tokens unrolled into one program (`unroll_draft_chain`): one call
    per drafted chain, not eight, for ~2 minutes more build on the bundled model."""
    # Lowered as the target is: the drafter keeps its cache prefix-valid (drafters/draft_model.py).
    drafter = _compile(state, state.draft, "draft_model", state.options.attention)
    state.update(draft_model=drafter.info,
                 programs=state.manifest.programs | {"draft_model": drafter.entry})
    if not state.options.draft_chain:
        return
    state.on_stage("draft model: pass unroll_draft_chain")
    chain = Pipeline((UnrollDraftChain(DEFAULT_MAX_DRAFT),))(drafter.result.program).program
    name = unrolled("draft_model")
    state.on_stage(f"lower {name} ({state.options.backend.value})")
    entry = lower_program(state.lowering, chain, state.out, name)
    state.update(programs=state.manifest.programs | {name: entry})


def _share_weights(state: BuildState) -> None:
    """Every program reads the weights it has in common with the others from one file
    (`BackendImpl.share_weights`): a draft call then leaves the target's weights in L3."""
    state.on_stage("share weights across programs")
    programs = state.manifest.programs
    shared = BACKENDS[state.options.backend].share_weights(
        [state.out / entry.file for entry in programs.values()])
    digests = {file.name: sha256_file(file) for file in shared}  # hashed once, read by all
    rewritten = {name: ProgramEntry.of(state.out / entry.file, entry.signature)
                 for name, entry in programs.items()}
    state.update(programs={name: entry.model_copy(update={"data_files": entry.data_files | digests})
                           for name, entry in rewritten.items()})


FULL = Stage("full program", _full_steps, _full)
DRAFT_MODEL = Stage("draft model", lambda o: (o.draft_model is not None)
                    * (_program_steps(o.attention) + 2 * o.draft_chain), _draft_model)
SHARED_WEIGHTS = Stage("shared weights",
                       lambda o: int(BACKENDS[o.backend].share_weights is not None),
                       _share_weights)


# ------------------------------------------------------------------ the manifest


def _toolchain() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in TOOLCHAIN}


def _tokenizer_info(source: SourceModel) -> TokenizerInfo:
    tokenizer = source.tokenizer
    # The digest of the bytes `Tokenizer.save` writes beside the manifest (the same pretty
    # JSON); the one setting those bytes lack is recorded beside it.
    digest = hashlib.sha256(tokenizer.to_str(pretty=True).encode()).hexdigest()
    return TokenizerInfo(sha256=digest, bos_id=source.bos_id, eos_ids=source.eos_ids,
                         encode_special_tokens=tokenizer.encode_special_tokens,
                         chat_template=source.chat_template)


def _manifest(full: CompiledProgram, options: BuildOptions, capture: CaptureOptions) -> Manifest:
    dims = full.result.program.dims
    return Manifest(
        leapc_version=importlib.metadata.version("leapc"),
        toolchain=_toolchain(),
        backend=options.backend,
        model=full.info,
        quantization=options.quantize,
        attention=options.attention,
        tokenizer=_tokenizer_info(full.source),
        programs={"full": full.entry},
        passes=full.result.ran,
        anatomy=tuple(recover_anatomy(full.result.program.program, dims.num_layers,
                                      dims.hidden_size).describe()),
        # the reference policy; the engine's full list: `_with_policies`, once complete
        policies=(Policy.MDM if full.info.diffusion else Policy.AR,),
        max_seq=capture.max_seq,
        max_new=capture.max_new,
    )


def _with_policies(manifest: Manifest) -> Manifest:
    """Every policy the engine's sections and programs can run (`runtime.policies`); the
    validation `model_copy` skips runs here, on the finished manifest."""
    return Manifest(**(dict(manifest) | {"policies": offered_policies(manifest)}))


# ------------------------------------------------------------------ the build, in order

STAGES: tuple[Stage, ...] = (
    # Phase 1: heads first: the full program's pipeline inserts them.
    HEADS,
    # Phase 2: the programs every policy runs: the target's step, the draft model's.
    FULL,
    DRAFT_MODEL,
    # Phase 3: what drafting policies read besides programs.
    DATASTORE,
    HEADS_PROGRAM,
    # Phase 4: self-speculation, sliced from the final full program (and measured on it).
    EXIT,
    ADAPTER,
    SKIP,
    # Phase 5: every program lowered; the weights they repeat stored once.
    SHARED_WEIGHTS,
)
