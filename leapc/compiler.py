"""The compiler driver: model → capture → passes → numeric check → lower → engine directory."""

from __future__ import annotations

import enum
import importlib.metadata
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leapc.datastore import DatastoreSource, build_datastore, read_texts
from leapc.ir.anatomy import recover_anatomy
from leapc.ir.capture import CaptureOptions, StepModule, capture
from leapc.ir.errors import InputError, parse_choice
from leapc.models.loaders import SourceModel, load_source, weights_sha256
from leapc.passes.insert_tree_attention import InsertTreeAttention
from leapc.passes.pipeline import Pipeline, PipelineResult, check_numerics, default_pipeline
from leapc.runtime.backends import aoti, eager, ort, tensorrt
from leapc.runtime.manifest import (
    Backend,
    DatastoreInfo,
    Manifest,
    ModelInfo,
    Policy,
    ProgramEntry,
    Quantization,
    TokenizerInfo,
    sha256_file,
)

LOWERINGS = {Backend.ORT: ort.lower, Backend.EAGER: eager.lower, Backend.AOTI: aoti.lower,
             Backend.TENSORRT: tensorrt.lower}
DEFAULT_MAX_SEQ = 1024
TOOLCHAIN = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")


class Attention(str, enum.Enum):
    """How the engine computes attention."""

    DENSE = "dense"  # as captured: SDPA under the dense [B, N, T + N] mask
    TREE = "tree"  # insert_tree_attention: leapc.tree_attention on the compact mask


# The faster lowering on each backend, measured by bench/bench_tree_attention.py
# (numbers in docs/decisions.md).
# TensorRT has no converter for the Python custom op (it would run it in torch between
# engine pieces), so dense attention there.
DEFAULT_ATTENTION = {Backend.ORT: Attention.TREE, Backend.EAGER: Attention.DENSE,
                     Backend.AOTI: Attention.TREE, Backend.TENSORRT: Attention.DENSE}


def pipeline(attention: Attention, dump_dir: Path | None = None) -> Pipeline:
    """The cleanups every engine gets, then the attention lowering."""
    lowering = (InsertTreeAttention(),) if attention is Attention.TREE else ()
    return Pipeline((*default_pipeline().passes, *lowering), dump_dir)


def stage_count(programs: int = 1, backend: str | Backend = Backend.ORT,
                attention: str | Attention | None = None, datastore: bool = False) -> int:
    """Stages reported through ``on_stage``: load, then per program capture, each pass,
    numeric check and lower, then the datastore if any."""
    full = len(pipeline(_attention(attention, _backend(backend))).passes)
    draft = len(pipeline(Attention.DENSE).passes)
    return 1 + (3 + full) + (programs - 1) * (3 + draft) + datastore


def _toolchain() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in TOOLCHAIN}


def _backend(value: str | Backend) -> Backend:
    return parse_choice(Backend, value, "backend")


def _attention(value: str | Attention | None, backend: Backend) -> Attention:
    if value is None:
        return DEFAULT_ATTENTION[backend]
    return parse_choice(Attention, value, "attention lowering")


def _quantization(value: str | Quantization, backend: Backend) -> Quantization:
    chosen = parse_choice(Quantization, value, "quantization")
    if chosen is not Quantization.NONE and backend is not Backend.ORT:
        raise InputError(f"--quantize {chosen.value} needs the ort backend (got {backend.value})")
    return chosen


def _options(source: SourceModel, max_seq: int | None, max_new: int) -> CaptureOptions:
    trained = getattr(source.model.config.get_text_config(), "max_position_embeddings", None)
    seq = max_seq or min(trained or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)
    if seq < 2:
        raise InputError(f"max-seq must be at least 2 (got {seq})")
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
        )


def _compile(source: SourceModel, name: str, options: CaptureOptions, backend: Backend,
             attention: Attention, quantization: Quantization, out: Path, dump_dir: Path | None,
             on_stage) -> CompiledProgram:
    """Capture → passes → numeric check → lower (→ quantize), for one model."""
    on_stage(f"capture {name}")
    captured = capture(source.model, options)
    dump = dump_dir / name if dump_dir else None
    passes = pipeline(attention, dump)
    result = passes(captured, on_pass=lambda p: on_stage(f"{name}: pass {p}"))
    on_stage(f"numeric check {name}")
    check_numerics(StepModule(source.model), result.program)
    on_stage(f"lower {name} ({backend.value})")
    file = LOWERINGS[backend](result.program, out, name)
    if quantization is Quantization.INT8:
        ort.quantize_weights(file, bits=8)
    entry = ProgramEntry(file=file.name, sha256=sha256_file(file),
                         signature=result.program.signature.to_json())
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
    dump_dir: Path | None = None,
    on_stage: Callable[[str], None] = lambda _: None,
) -> Path:
    """Build an engine for ``model`` into ``out_dir``; return ``out_dir``.

    ``model`` (and ``draft_model``, a smaller model with the same vocabulary for the
    ``draft`` policy) is ``"bundled"``, a Hugging Face directory, a llama2.c ``.bin``, or
    an already loaded `SourceModel`. ``datastore`` (for the ``retrieval`` policy) is
    ``"bundled"`` (the bundled model's training corpus) or text files and directories.
    ``quantize="int8"`` (ORT only) stores MatMul weights as int8 (weight-only).
    ``attention`` is ``"dense"`` or ``"tree"`` (default: the
    faster one on the backend). ``max_new`` bounds N: the prefill chunk and the largest
    tree one step verifies.
    """
    chosen = _backend(backend)
    lowering = _attention(attention, chosen)
    quantization = _quantization(quantize, chosen)
    if chosen is Backend.TENSORRT:
        tensorrt.require()  # before minutes of capture, not after
    on_stage("load")
    source = _load(model, tokenizer)
    draft = _load(draft_model, None) if draft_model is not None else None
    if draft is not None and draft.model.config.vocab_size != source.model.config.vocab_size:
        raise InputError("the draft model's vocabulary size differs from the model's")
    options = _options(source, max_seq, max_new)
    corpus = read_texts(datastore) if datastore is not None else None  # user errors first
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    full = _compile(source, "full", options, chosen, lowering, quantization, out, dump_dir,
                    on_stage)
    # The draft model keeps dense attention: its tree drafts put ancestors' KV rows as
    # scratch after the committed ones, so its valid slots are not a prefix, which the tree
    # lowering's compact mask assumes.
    drafter = (_compile(draft, "draft_model", options, chosen, Attention.DENSE, quantization,
                        out, dump_dir, on_stage) if draft is not None else None)
    store = None
    if corpus is not None:
        on_stage("datastore")
        store = build_datastore(*corpus, source.tokenizer, out)
    source.tokenizer.save(str(out / "tokenizer.json"))
    _manifest(full, drafter, store, chosen, quantization, options).write(out)
    return out


def _manifest(full: CompiledProgram, draft: CompiledProgram | None,
              datastore: DatastoreInfo | None, backend: Backend, quantization: Quantization,
              options: CaptureOptions) -> Manifest:
    dims = full.result.program.dims
    programs = {"full": full.entry} | ({"draft_model": draft.entry} if draft else {})
    policies = (Policy.AR, Policy.LOOKUP, Policy.RECYCLE, Policy.LOOKAHEAD) + (
        (Policy.DRAFT,) if draft else ()) + ((Policy.RETRIEVAL,) if datastore else ())
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
        quantization=quantization,
        tokenizer=TokenizerInfo(bos_id=full.source.bos_id, eos_ids=full.source.eos_ids),
        programs=programs,
        passes=full.result.ran,
        anatomy=tuple(recover_anatomy(full.result.program.program, dims.num_layers,
                                      dims.hidden_size).describe()),
        policies=policies,
        max_seq=options.max_seq,
        max_batch=options.max_batch,
        max_new=options.max_new,
    )
