"""The compiler driver: model → capture → passes → numeric check → lower → engine directory."""

from __future__ import annotations

import importlib.metadata
import shutil
from collections.abc import Callable
from pathlib import Path

from leapc.ir.anatomy import recover_anatomy
from leapc.ir.capture import CaptureOptions, StepModule, capture
from leapc.ir.errors import InputError
from leapc.models.loaders import SourceModel, load_source, weights_sha256
from leapc.passes.pipeline import check_numerics, default_pipeline
from leapc.runtime.backends import eager, ort
from leapc.runtime.manifest import (
    Backend,
    Manifest,
    ModelInfo,
    Policy,
    ProgramEntry,
    TokenizerInfo,
    sha256_file,
)

LOWERINGS = {Backend.ORT: ort.lower, Backend.EAGER: eager.lower}
DEFAULT_MAX_SEQ = 1024
TOOLCHAIN = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")


def stage_count() -> int:
    """Stages reported through ``on_stage``: load, capture, each pass, check, lower."""
    return 4 + len(default_pipeline().passes)


def _toolchain() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in TOOLCHAIN}


def _backend(value: str | Backend) -> Backend:
    try:
        return Backend(value)
    except ValueError:
        known = ", ".join(b.value for b in Backend)
        raise InputError(f"unknown backend {value!r} (known: {known})") from None


def _options(source: SourceModel, max_seq: int | None, max_new: int) -> CaptureOptions:
    trained = getattr(source.model.config.get_text_config(), "max_position_embeddings", None)
    seq = max_seq or min(trained or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)
    if seq < 2:
        raise InputError(f"max-seq must be at least 2 (got {seq})")
    return CaptureOptions(max_seq=seq, max_new=min(max_new, seq - 1))


def build(
    model: str | Path | SourceModel,
    out_dir: str | Path,
    backend: str | Backend = Backend.ORT,
    *,
    max_seq: int | None = None,
    max_new: int = 128,
    tokenizer: Path | None = None,
    dump_dir: Path | None = None,
    on_stage: Callable[[str], None] = lambda _: None,
) -> Path:
    """Build an engine for ``model`` into ``out_dir``; return ``out_dir``.

    ``model`` is ``"bundled"``, a Hugging Face directory, a llama2.c ``.bin``, or an
    already loaded `SourceModel`. ``max_new`` bounds N: the prefill chunk and, later,
    the largest tree one step verifies.
    """
    chosen = _backend(backend)
    on_stage("load")
    source = model if isinstance(model, SourceModel) else load_source(model, tokenizer)
    options = _options(source, max_seq, max_new)
    on_stage("capture")
    captured = capture(source.model, options)
    result = default_pipeline(dump_dir)(captured, on_pass=lambda name: on_stage(f"pass {name}"))
    on_stage("numeric check")
    check_numerics(StepModule(source.model), result.program)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    on_stage(f"lower ({chosen.value})")
    program_file = LOWERINGS[chosen](result.program, out, "full")
    source.tokenizer.save(str(out / "tokenizer.json"))
    _manifest(source, chosen, result, options, program_file).write(out)
    return out


def _manifest(source, backend: Backend, result, options: CaptureOptions, program_file: Path):
    dims = result.program.dims
    return Manifest(
        leapc_version=importlib.metadata.version("leapc"),
        toolchain=_toolchain(),
        backend=backend,
        model=ModelInfo(
            source=source.name, family=source.family, num_layers=dims.num_layers,
            num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim,
            hidden_size=dims.hidden_size, vocab_size=dims.vocab_size, dtype=dims.dtype,
            weights_sha256=weights_sha256(source.model),
        ),
        tokenizer=TokenizerInfo(bos_id=source.bos_id, eos_ids=source.eos_ids),
        programs={"full": ProgramEntry(file=program_file.name, sha256=sha256_file(program_file),
                                       signature=result.program.signature.to_json())},
        passes=result.ran,
        anatomy=tuple(recover_anatomy(result.program.program, dims.num_layers,
                                      dims.hidden_size).describe()),
        policies=(Policy.AR, Policy.LOOKUP, Policy.RECYCLE),
        max_seq=options.max_seq,
        max_batch=options.max_batch,
        max_new=options.max_new,
    )
