"""What every backend provides (`BackendImpl`) and the `BACKENDS` table; a backend's
``load`` returns a `StepFunction` (runtime/step.py).

The runtime loop speaks numpy (the ONNX path has no torch); a backend converts at its
boundary. ``lower`` (which needs torch) lives in each backend's module but imports torch
inside the call, so loading an ORT engine never imports it.
"""

from __future__ import annotations

import enum
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from leapc.ir.errors import InputError
from leapc.runtime.manifest import Attention, Backend, ProgramEntry, Quantization
from leapc.runtime.step import StepFunction

if TYPE_CHECKING:
    from leapc.ir.capture import CapturedProgram


class Device(str, enum.Enum):
    """Where an engine's programs run. ORT engines pick execution providers by it."""

    CPU = "cpu"
    CUDA = "cuda"  # ORT's CUDA execution provider
    TENSORRT = "tensorrt"  # ORT's TensorRT execution provider (CUDA for what it lacks)


def configured_threads() -> int:
    """``LEAPC_THREADS``: the threads every program of the process runs on; 0 (or unset)
    leaves the choice to the backend (all cores)."""
    value = os.environ.get("LEAPC_THREADS", "").strip()
    if not value:
        return 0
    if value.isascii() and value.isdigit():
        return int(value)
    raise InputError(f"LEAPC_THREADS must be a whole number of threads, 0 for all cores "
                     f"(got {value!r})")


def thread_count() -> int:
    """The threads programs run on: ``LEAPC_THREADS``, or every core."""
    return configured_threads() or os.cpu_count() or 1


class Compression(str, enum.Enum):
    """What a lowered program's outputs are used for, which bounds how approximate its
    weights may be. The backend decides what, if anything, that lets it compress
    (`BackendImpl.compresses`); the others leave the file as lowered."""

    NONE = "none"  # exact: a target step, an early exit's remainder
    # Only proposes (verification is exact) and its KV rows are scratch: every weight may
    # be approximate (skip drafts, the heads program).
    DRAFT = "draft"
    # Proposes, but from hidden states and KV rows the target reuses: only the vocabulary
    # projection may be approximate (the early-exit draft, kangaroo).
    VOCAB_PROJECTION = "vocab-projection"
    INT8 = "int8"  # `--quantize int8`: the engine's own programs, int8 (leapc's Q8MatMul)
    INT8_NBITS = "int8-nbits"  # `--quantize int8-nbits`: the same in ORT's MatMulNBits
    INT4 = "int4"  # `--quantize int4`: the same, 4-bit
    BF16 = "bf16"  # `--quantize bf16`: the engine's own programs, bfloat16 (leapc's BF16MatMul)


# The uses whose logits only propose: what `--draft-vocab` restricts.
DRAFTING = frozenset({Compression.DRAFT, Compression.VOCAB_PROJECTION})


def uncompressed(file: Path, program: CapturedProgram, compression: Compression) -> None:
    """``compress`` of backends that compress nothing: every program is stored as lowered."""


def cpu_only(backend: Backend) -> Callable[[Device], None]:
    """``check_device`` of backends that run on the CPU only."""
    def check(device: Device) -> None:
        if device is not Device.CPU:
            raise InputError(f"--device {device.value} is for ort engines; this engine's "
                             f"backend is {backend.value}")
    return check


@dataclass(frozen=True)
class BackendImpl:
    """What a backend provides: the compile side (``lower``, ``compress``; they import
    torch or the exporter's packages inside the call) and the run side (``load``,
    ``check_device``). Importing a backend's module imports no torch: the table below
    resolves without it, and the ORT backend's ``load`` never needs it."""

    name: Backend
    default_attention: Attention  # the faster lowering here (docs/decisions.md)
    # ``(program, out_dir, name, attention) -> out_dir/<name><suffix>``, the file written;
    # ``attention`` is one of ``attentions``
    lower: Callable[[CapturedProgram, Path, str, Attention], Path]
    # ``(path, outputs, device)``: a lowered program, callable on numpy arrays in
    # signature order
    load: Callable[[Path, tuple[str, ...], Device], StepFunction]
    # ``InputError`` (one line) where programs cannot run on ``device`` here
    check_device: Callable[[Device], None]
    # ``(file, program, compression)``: rewrite ``file`` in place as ``compression``
    # allows, or leave it; ``compresses`` states which ones it acts on
    compress: Callable[[Path, CapturedProgram, Compression], None] = uncompressed
    compresses: frozenset[Compression] = frozenset()
    attentions: frozenset[Attention] = frozenset({Attention.DENSE, Attention.TREE})
    # ``(program files) -> files``: once every program is lowered, rewrite them to read
    # the weights they repeat from one place; the files they now read besides their own.
    # None: each program keeps its own weights
    share_weights: Callable[[list[Path]], tuple[Path, ...]] | None = None


class _Table(Mapping[Backend, BackendImpl]):
    """``Backend -> BackendImpl``, importing a backend's module (its ``BACKEND``) on lookup."""

    def __init__(self, modules: dict[Backend, str]):
        self._modules = modules

    def __getitem__(self, backend: Backend) -> BackendImpl:
        return importlib.import_module(self._modules[backend]).BACKEND

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


# Adding a backend: one module defining ``BACKEND`` (a `BackendImpl`), one line here.
BACKENDS: Mapping[Backend, BackendImpl] = _Table({
    Backend.EAGER: "leapc.runtime.backends.eager",
    Backend.ORT: "leapc.runtime.backends.ort",
    Backend.AOTI: "leapc.runtime.backends.aoti",
    Backend.TENSORRT: "leapc.runtime.backends.tensorrt",
})


@dataclass(frozen=True)
class Lowering:
    """What every program of one engine is lowered with."""

    backend: Backend
    attention: Attention
    quantization: Quantization = Quantization.NONE
    # The tokens a draft program may propose (`passes.restrict_draft_vocabulary`); empty:
    # every token. Only programs whose use is to propose (`DRAFTING`) are restricted.
    draft_vocabulary: tuple[int, ...] = ()

    def compression(self, use: Compression) -> Compression:
        """How a program whose outputs serve ``use`` is compressed. On an int8 engine every
        program is int8: the target's step is, and a program that shares KV rows or hidden
        states with it (an early exit's draft) must compute them as the step does."""
        if self.quantization is Quantization.NONE:
            return use
        return Compression(self.quantization.value)


def lower_program(lowering: Lowering, program: CapturedProgram, out: Path, name: str,
                  use: Compression = Compression.NONE) -> ProgramEntry:
    """Lower ``program`` to ``out/<name>.*``, compress it as its ``use`` allows, and return
    its manifest entry (every lowering site goes through here)."""
    impl = BACKENDS[lowering.backend]
    if lowering.draft_vocabulary and use in DRAFTING:
        from leapc.passes.pipeline import Pipeline  # build-time only: torch
        from leapc.passes.restrict_draft_vocabulary import RestrictDraftVocabulary

        restrict = RestrictDraftVocabulary(lowering.draft_vocabulary)
        program = Pipeline((restrict,))(program).program
    file = impl.lower(program, out, name, lowering.attention)
    impl.compress(file, program, lowering.compression(use))
    return ProgramEntry.of(file, program.signature.to_json())
