"""What a build is made of: its options, the state its stages share, and a stage.

`leapc.compiler.build` runs an ordered list of `Stage`s (compiler.STAGES); each lives
beside its feature (leapc/heads.py, leapc/datastore.py, leapc/early_exit.py,
leapc/layer_skip.py) and says how many progress steps it reports for given options, so
the progress bar's total comes from the list itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from leapc.draft_vocabulary import DraftVocabularyOptions
from leapc.ir.capture import CaptureOptions
from leapc.ir.errors import InputError, parse_choice
from leapc.ir.skip_spec import SkipSet
from leapc.models.loaders import SourceModel, weights_sha256
from leapc.passes.pipeline import PipelineResult
from leapc.runtime.backends.base import BACKENDS, BackendImpl, Compression, Lowering
from leapc.runtime.engine import load_program
from leapc.runtime.manifest import (
    Attention,
    Backend,
    Manifest,
    ModelInfo,
    ProgramEntry,
    Quantization,
)
from leapc.runtime.step import StepFunction

if TYPE_CHECKING:
    from leapc.datastore import DatastoreSource
    from leapc.early_exit import AdapterOptions
    from leapc.heads import HeadsOptions
    from leapc.ir.heads import DecodingHeads
    from leapc.models.heads import HeadsReport


class Auto(str, enum.Enum):
    """A build choice leapc measures on the target backend instead of taking it as given
    (`--exit-layer auto`, `--skip auto`, `--tree auto`)."""

    AUTO = "auto"


AUTO = Auto.AUTO


@dataclass(frozen=True)
class BuildOptions:
    """Everything `leapc build` takes besides the model and the output directory."""

    backend: Backend = Backend.ORT
    attention: Attention = Attention.TREE  # `parse`: the backend's default
    max_seq: int | None = None  # None: the model's trained positions, at most 1024
    max_new: int = 128  # bounds N: the prefill chunk and the widest verify step
    max_batch: int = 8  # bounds B: the rows a scheduler runs per step (`leapc serve`)
    tokenizer: Path | None = None  # for a llama2.c model
    draft_model: str | Path | SourceModel | None = None  # policy draft
    draft_chain: bool = False  # with draft_model: its greedy chain unrolled into one program
    datastore: DatastoreSource | None = None  # policy retrieval
    quantize: Quantization = Quantization.NONE
    heads: HeadsOptions | None = None  # medusa / hydra
    exit_layer: int | Auto | None = None  # early-exit (and kangaroo with ``adapter``)
    adapter: AdapterOptions | None = None
    skip: SkipSet | Auto | str | None = None  # layer-skip, swift; a str is parsed at load
    dump_dir: Path | None = None  # each pass's graph code
    tune_prompts: tuple[str, ...] | None = None  # `--tune`: measure the policies on these
    draft_vocab: DraftVocabularyOptions | None = None  # drafts propose these tokens only

    @classmethod
    def parse(cls, backend: str | Backend = Backend.ORT, attention: str | None = None,
              quantize: str | Quantization = Quantization.NONE,
              exit_layer: int | str | None = None, skip: str | None = None,
              **options) -> BuildOptions:
        """The options from user values (strings for the enums and ``"auto"``), each
        refused with one line if it is not one."""
        chosen = parse_choice(Backend, backend, "backend")
        quantization = _quantization(quantize, chosen)
        return cls(backend=chosen, attention=_attention(attention, chosen, quantization),
                   quantize=quantization, exit_layer=_exit_layer(exit_layer),
                   skip=AUTO if skip == AUTO else skip, **options)

    @property
    def lowering(self) -> Lowering:
        return Lowering(self.backend, self.attention, self.quantize)


def _attention(value: str | None, backend: Backend, quantization: Quantization) -> Attention:
    """The chosen lowering; by default the backend's faster one, or on reduced-precision
    weights a width-invariant one, without which no drafting policy reproduces `ar` there:
    leapc's kernel where the engine carries leapc's library anyway (``int8``, ``bf16``),
    else the ONNX one."""
    if value is None:
        if quantization in (Quantization.INT8, Quantization.BF16):
            return Attention.KERNEL
        return (Attention.INVARIANT if quantization is not Quantization.NONE
                else BACKENDS[backend].default_attention)
    chosen = parse_choice(Attention, value, "attention lowering")
    _check_offered(f"--attention {chosen.value}", backend,
                   lambda impl: chosen in impl.attentions)
    return chosen


def _quantization(value: str | Quantization, backend: Backend) -> Quantization:
    chosen = parse_choice(Quantization, value, "quantization")
    if chosen is not Quantization.NONE:
        _check_offered(f"--quantize {chosen.value}", backend,
                       lambda impl: Compression(chosen.value) in impl.compresses)
    return chosen


def _check_offered(flag: str, backend: Backend, offers: Callable[[BackendImpl], bool]) -> None:
    """Refuse ``flag`` in one line naming the backends that offer it, if ``backend`` does not."""
    if not offers(BACKENDS[backend]):
        able = [b.value for b in Backend if offers(BACKENDS[b])]
        raise InputError(f"{flag} needs the {' or '.join(able)} backend (got {backend.value})")


def _exit_layer(value: int | str | None) -> int | Auto | None:
    if value is None or isinstance(value, int):
        return value
    if value == AUTO:
        return AUTO
    raise InputError(f"exit layer must be a layer number or 'auto' (got {value!r})")


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
            source=self.source.name, family=self.source.family, dims=dims,
            weights_sha256=weights_sha256(self.source.model),
            max_positions=self.source.trained_positions,
            diffusion=self.source.block_diffusion,
        )


@dataclass
class BuildState:
    """What the stages have made so far: the one mutable object of a build."""

    options: BuildOptions
    on_stage: Callable[[str], None]
    out: Path | None = None  # the staging directory; None while the inputs are read
    source: SourceModel | None = None
    draft: SourceModel | None = None
    capture: CaptureOptions | None = None
    corpus: tuple[str, list[str]] | None = None  # the datastore's (description, texts)
    heads: tuple[DecodingHeads, HeadsReport] | None = None
    full: CompiledProgram | None = None
    manifest: Manifest | None = None  # its policies are listed once, when it is written
    draft_vocabulary: tuple[int, ...] = ()  # `--draft-vocab`'s ids; empty: every token

    @property
    def lowering(self) -> Lowering:
        """What this build's programs are lowered with (`BuildOptions.lowering`, and the
        draft vocabulary once the tokenizer has chosen it)."""
        return replace(self.options.lowering, draft_vocabulary=self.draft_vocabulary)

    def update(self, **fields) -> None:
        """Add sections or programs to the manifest (validated whole when written)."""
        self.manifest = self.manifest.model_copy(update=fields)

    def program(self, entry: ProgramEntry, directory: Path | None = None) -> StepFunction:
        """A program this build lowered (into ``out``, or ``directory``), loaded to be
        measured on the backend as the runtime will run it."""
        path = (directory or self.out) / entry.file
        return load_program(self.options.backend, path, entry.output_names)


@dataclass(frozen=True)
class Stage:
    name: str
    # The progress steps it reports through ``on_stage`` for these options; 0: not run.
    steps: Callable[[BuildOptions], int]
    run: Callable[[BuildState], None]
