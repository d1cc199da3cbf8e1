"""The engine manifest: a versioned, validated description of an engine directory.

No torch here: the ONNX run path reads manifests on machines that have no torch.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from leapc.ir.dims import ModelDims
from leapc.ir.errors import EngineError
from leapc.ir.head_spec import HeadKind, HeadPlacement
from leapc.runtime.datastore import SUFFIXES_FILE, TOKENS_FILE
from leapc.runtime.diffusion import BlockDiffusion
from leapc.runtime.policies import POLICIES, Policy

SCHEMA_VERSION = 2  # 2: ModelInfo.dims; no addons, max_batch
MANIFEST_FILE = "manifest.json"


class Backend(str, enum.Enum):
    EAGER = "eager"
    ORT = "ort"
    AOTI = "aoti"
    TENSORRT = "tensorrt"  # Torch-TensorRT; needs CUDA


class Quantization(str, enum.Enum):
    NONE = "none"  # weights as the model stores them (float32 here)
    # MatMul weights int8 per 32 inputs, activations int8 per 32 on the fly: leapc's
    # Q8MatMul (AVX512-VNNI; each row's result independent of the rows beside it)
    INT8 = "int8"
    INT8_NBITS = "int8-nbits"  # the same scheme in ONNX Runtime's MatMulNBits
    INT4 = "int4"  # the same with 4-bit weights: half the bytes a step streams
    # MatMul weights bfloat16 (a bf16 checkpoint as stored: half the bytes of float32),
    # activations and arithmetic float32: leapc's BF16MatMul (each row's result
    # independent of the rows beside it)
    BF16 = "bf16"


class Attention(str, enum.Enum):
    """How the engine computes attention (a build choice; each backend has a default)."""

    DENSE = "dense"  # as captured: SDPA under the dense [B, N, T + N] mask
    TREE = "tree"  # insert_tree_attention: leapc.tree_attention on the compact mask
    # TREE, lowered so that a token's row of every output is bit-identical in steps of any
    # width and wherever free cache slots sit, up to INVARIANT_MAX_KEYS keys
    # (`_width_invariant_attention`; ORT only)
    INVARIANT = "invariant"
    # TREE as leapc's own kernel (``ai.leapc::TreeAttention``, compiled into the engine;
    # ORT on AVX-512 only): width-invariant at any length, reads the cache in place
    KERNEL = "kernel"

    @property
    def compact_mask(self) -> bool:
        """Whether the step program computes attention with ``leapc.tree_attention``."""
        return self is not Attention.DENSE

    @property
    def width_invariant(self) -> bool:
        """Whether a token's row of every output is bit-identical in steps of any width."""
        return self in (Attention.INVARIANT, Attention.KERNEL)


# The longest row (past + new keys) INVARIANT attention keeps bit-identical: ONNX Runtime's
# GEMM sums a row's keys in order within blocks of this many (`_weighted_values`).
INVARIANT_MAX_KEYS = 1024


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BlockDiffusionInfo(_Frozen):
    """A block-diffusion model's decoding contract (DESIGN §7c, runtime/diffusion.py),
    from its config's `leapc.models.loaders.DIFFUSION_KEY`."""

    block_size: int = Field(ge=1)
    mask_token_id: int = Field(ge=0)
    logits_shift: Literal[0, 1]  # 1: the row at position i predicts position i + 1

    @property
    def contract(self) -> BlockDiffusion:
        return BlockDiffusion(self.block_size, self.mask_token_id, self.logits_shift)


class ModelInfo(_Frozen):
    source: str  # what was built: "bundled", or the model's path (for `bench --vs-hf`)
    family: str
    dims: ModelDims  # what the runtime sizes the KV cache by
    weights_sha256: str
    # Positions the model was trained for (its config's max_position_embeddings; None if the
    # config names none): past them a model's outputs are not what it learned.
    max_positions: int | None
    diffusion: BlockDiffusionInfo | None = None  # a block-diffusion model: how it unmasks

    @field_validator("dims")
    @classmethod
    def _known_dtype(cls, value: ModelDims) -> ModelDims:
        try:
            np.dtype(value.dtype)  # the runtime allocates the KV cache in it
        except TypeError:
            raise ValueError(f"unknown dtype {value.dtype!r}") from None
        return value


class TokenizerInfo(_Frozen):
    file: str = "tokenizer.json"
    sha256: str
    bos_id: int | None
    eos_ids: tuple[int, ...]
    # True: typed special-token text ("</s>") encodes as text, not as the control token.
    # `Tokenizer.save` does not serialize this flag, so `Engine.load` sets it from here:
    # without it the run-time encoding of such a prompt would differ from the build's.
    encode_special_tokens: bool
    # The model's Jinja chat template (`SourceModel.chat_template`), if it has one.
    chat_template: str | None = None


class _TensorJson(_Frozen):
    name: str
    dtype: str
    # Integers and B, N, T: `leapc inspect` hands these strings to sympy, which evaluates.
    shape: tuple[Annotated[str, StringConstraints(pattern=r"^[0-9BNT+*() -]+$")], ...]


class _SignatureJson(_Frozen):
    """The form of ``StepSignature.to_json()``: checked at load, so reading a program's
    inputs and outputs from a hand-edited manifest is an `EngineError`, not a KeyError."""

    inputs: tuple[_TensorJson, ...]
    outputs: tuple[_TensorJson, ...]
    bounds: dict[str, tuple[int, int]]
    max_seq: int


class ProgramEntry(_Frozen):
    file: str
    sha256: str
    signature: dict  # StepSignature.to_json(); shapes as strings of B, N, T
    # Files the program reads beside its own: name -> digest. ONNX external weights
    # (``<file>.data``, which the exporter writes for programs over 2 GB, or the engine's
    # one ``weights.data`` and its index ``weights.json``, which its programs share), and
    # the custom-op library compiled for it (``<stem>.ops.so``, `leapc.kernels.ort_ops`).
    data_files: dict[str, str] = {}

    @classmethod
    def of(cls, file: Path, signature: dict) -> ProgramEntry:
        """The entry of a lowered program file (and the files it reads, if any), hashed."""
        beside = (file.with_name(f"{file.name}.data"), file.with_suffix(".ops.so"))
        extra = {data.name: sha256_file(data) for data in beside if data.is_file()}
        return cls(file=file.name, sha256=sha256_file(file), signature=signature,
                   data_files=extra)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The program's outputs, in the order it returns them."""
        return tuple(o["name"] for o in self.signature["outputs"])

    def output_shape(self, name: str) -> tuple[str, ...]:
        """Output ``name``'s shape as the signature writes it (``"B"``, ``"N + 7"``, ``"8"``)."""
        return next(tuple(o["shape"]) for o in self.signature["outputs"] if o["name"] == name)

    @field_validator("signature")
    @classmethod
    def _signature_form(cls, value: dict) -> dict:
        try:
            _SignatureJson.model_validate(value)
        except ValidationError as err:  # one line, not pydantic's nested report
            raise ValueError(_first_error(err)) from None
        return value  # kept a dict: the runtime and compiler read it as one


class DatastoreInfo(_Frozen):
    """The retrieval policy's corpus: a token stream and its suffix array (two .npy files)."""

    directory: str = "datastore"
    source: str  # what it was built from: "bundled" (the bundled model's corpus) or paths
    documents: int
    tokens: int
    depth: int  # suffixes are sorted on this many leading tokens
    sha256: dict[str, str]  # file name -> digest

    @field_validator("sha256")
    @classmethod
    def _hashes_what_is_read(cls, value: dict[str, str]) -> dict[str, str]:
        missing = sorted({TOKENS_FILE, SUFFIXES_FILE} - value.keys())
        if missing:  # the runtime would read it unchecked
            raise ValueError(f"no digest of {', '.join(missing)}, which the runtime reads")
        return value


class TreeChoice(_Frozen):
    """How the static tree was chosen: by hand (a file, or the default) or by `--tree auto`
    (Sequoia's program on the measured acceptance table, for the measured best budget)."""

    source: str  # "default", "auto", or the tree file's path
    acceptance: tuple[tuple[float, ...], ...] = ()  # [depth][rank], measured at build
    curve: tuple[tuple[int, float, float], ...] = ()  # (nodes, expected tau, predicted tok/s)


class HeadsInfo(_Frozen):
    """Trained decoding heads: their config, where they run, the static tree, and training."""

    directory: str = "heads"  # heads.safetensors + heads.json, as trained
    kind: HeadKind
    num_heads: int
    num_blocks: int
    placement: HeadPlacement
    tree: tuple[tuple[int, ...], ...]  # static tree, rank paths
    tree_choice: TreeChoice
    top1: tuple[float, ...]  # per head, held out: P(top-1 == the model's argmax at t + k)
    top5: tuple[float, ...]
    sha256: dict[str, str]  # file name -> digest


class KangarooPoint(_Frozen):
    """One measured configuration of ``kangaroo``: greedy, chains of at most ``depth``,
    stopped below the top-1 probability ``confidence``."""

    depth: int
    confidence: float
    tokens_per_s: float
    tau: float


class AdapterInfo(_Frozen):
    """Kangaroo's trained adapter at the exit (the ``kangaroo`` program runs it): its
    training, how often the exit's argmax equals the model's (held out) without and with
    it, and the policy's default draft length and stop, the fastest measured."""

    directory: str = "adapter"  # adapter.safetensors + adapter.json, as trained
    steps: int
    seconds: float
    agreement_before: float
    agreement_after: float
    depth: int
    confidence: float
    ar_tokens_per_s: float  # ``ar`` on the same prompts, same run
    sweep: tuple[KangarooPoint, ...]
    sha256: dict[str, str]  # file name -> digest


class ExitPoint(_Frozen):
    """One measured configuration of `--exit-layer auto`: greedy ``early-exit`` with chains of
    ``depth`` from the exit after ``layer`` layers, on the build's calibration prompts."""

    layer: int
    depth: int
    tokens_per_s: float
    tau: float


class ExitChoice(_Frozen):
    """How the exit layer was chosen (``given`` by `--exit-layer E`, or ``auto``: the fastest
    point of the sweep) and the draft length ``early-exit`` uses unless told otherwise."""

    source: Literal["given", "auto"]
    depth: int
    ar_tokens_per_s: float | None = None  # ``ar`` on the same prompts, same run
    sweep: tuple[ExitPoint, ...] = ()


class SkipPoint(_Frozen):
    """One measured configuration of `--skip auto`: greedy ``layer-skip`` with chains of
    ``depth``, its draft bypassing ``skip``."""

    skip: str
    depth: int
    tokens_per_s: float
    tau: float


class SkipChoice(_Frozen):
    """How the skip set was chosen (``given`` by `--skip LIST`, or ``auto``: the fastest
    measured set of the greedy agreement path) and ``layer-skip``'s default draft length."""

    source: Literal["given", "auto"]
    depth: int
    ar_tokens_per_s: float | None = None  # ``ar`` on the same prompts, same run
    path: tuple[tuple[str, float], ...] = ()  # (set, argmax agreement) after each step
    points: tuple[SkipPoint, ...] = ()
    candidates: tuple[str, ...] = ()  # program ``skip_<i>`` bypasses candidates[i]


class TunedRun(_Frozen):
    """One configuration `leapc build --tune` measured: a policy (at its default options
    but ``max_draft``), greedy, on the calibration prompts."""

    policy: Policy
    max_draft: int | None = None  # None: the policy's default
    tokens_per_s: float
    tau: float
    identical_to_ar: bool  # False: never chosen (a lossless policy left ``ar``'s tokens)


class Tuning(_Frozen):
    """`leapc build --tune`: the engine's policies measured on the machine that built it;
    ``--policy auto`` runs ``table[choice]``, the fastest run identical to ``ar``."""

    prompts: int
    max_new_tokens: int
    repeats: int
    threads: int  # the CPU threads the runs had (speed is this machine's)
    table: tuple[TunedRun, ...]
    choice: int

    @model_validator(mode="after")
    def _chosen(self) -> Tuning:
        if not 0 <= self.choice < len(self.table) or not self.table[self.choice].identical_to_ar:
            raise ValueError(f"tuning choice {self.choice} is not a run identical to ar")
        return self

    @property
    def chosen(self) -> TunedRun:
        return self.table[self.choice]


class Manifest(_Frozen):
    schema_version: Literal[2] = SCHEMA_VERSION
    leapc_version: str
    toolchain: dict[str, str]
    backend: Backend
    model: ModelInfo
    draft_model: ModelInfo | None = None  # the ``draft_model`` program's model, if any
    datastore: DatastoreInfo | None = None  # the ``retrieval`` policy's corpus, if any
    heads: HeadsInfo | None = None  # decoding heads (the ``heads`` program), if any
    exit_layer: int | None = None  # early exit: the ``draft`` program runs layers < it + exit
    exit_choice: ExitChoice | None = None  # with exit_layer: how it and the draft length were chosen
    adapter: AdapterInfo | None = None  # with exit_layer: Kangaroo's adapter, if trained
    skip: str | None = None  # layer skip: the sublayers the chosen ``skip_<i>`` program bypasses
    skip_choice: SkipChoice | None = None  # with skip: how it and the draft length were chosen
    quantization: Quantization = Quantization.NONE
    attention: Attention | None = None  # None: built before the manifest recorded it
    # `--draft-vocab`: how many tokens the draft programs may propose (None: all)
    draft_vocabulary: int | None = None
    tokenizer: TokenizerInfo
    programs: dict[str, ProgramEntry]  # "full", "draft_model", "heads", "draft", "remainder",
    # "kangaroo", "skip_<i>"
    passes: tuple[str, ...]
    anatomy: tuple[tuple[str, str], ...] = ()  # landmark -> graph node, for `leapc inspect`
    policies: tuple[Policy, ...]
    max_seq: int
    max_new: int
    tuning: Tuning | None = None  # `--tune`: what ``--policy auto`` runs

    @model_validator(mode="after")
    def _whole(self) -> Manifest:
        """The fields agree with each other: every listed policy finds the sections and
        programs it runs, and the limits and token ids fit the model."""
        _check_limits(self)
        _check_token_ids(self)
        _check_full(self)
        _check_policies(self)
        _check_sections(self)
        return self

    @property
    def inexact_verification(self) -> str | None:
        """Why a token's logits in a verify step may differ from the ones a one-token `ar`
        step gives it (so drafting policies would not reproduce `ar`), or None.

        On int8 weights ORT quantizes activations on the fly, which turns the ~1e-7 a row
        of attention moves between step widths into a whole quantization step (1e-3..2e-2
        on the logits): only width-invariant attention verifies exactly there (leapc's
        kernel at any length; the ONNX lowering up to `INVARIANT_MAX_KEYS`). Float32 steps move by ~1e-6 of the
        logits, and greedy verification has emitted `ar`'s tokens in every test."""
        if self.quantization is Quantization.NONE:
            return None
        if self.attention is None or not self.attention.width_invariant:
            attention = getattr(self.attention, "value", "not recorded")
            return (f"needs float weights or --attention kernel|invariant to draft (the engine "
                    f"is {self.quantization.value}, attention {attention})")
        if self.attention is Attention.INVARIANT and self.max_seq > INVARIANT_MAX_KEYS:
            return (f"needs --max-seq <= {INVARIANT_MAX_KEYS} to draft on "
                    f"{self.quantization.value} weights (the engine's is {self.max_seq})")
        return None

    def write(self, engine_dir: Path) -> None:
        (engine_dir / MANIFEST_FILE).write_text(self.model_dump_json(indent=2))


# The programs a section describes: a manifest with the section must have them.
_SECTION_PROGRAMS: dict[str, Callable[[Manifest], tuple[str, ...]]] = {
    "draft_model": lambda m: ("draft_model",),
    "heads": lambda m: ("heads",) if m.heads.placement is HeadPlacement.PROGRAM else (),
    "exit_layer": lambda m: ("draft", "remainder"),
    "adapter": lambda m: ("kangaroo", "remainder"),
    "skip_choice": lambda m: tuple(f"skip_{i}" for i in range(len(m.skip_choice.candidates))),
}
# Sections that only make sense with another one.
_SECTION_NEEDS = {"exit_choice": "exit_layer", "adapter": "exit_layer", "skip": "skip_choice",
                  "skip_choice": "skip"}


def _check_limits(m: Manifest) -> None:
    if not 0 < m.max_new < m.max_seq:
        raise ValueError(f"max_new must be at least 1 and below max_seq {m.max_seq} "
                         f"(got {m.max_new})")
    trained = m.model.max_positions
    if trained is not None and m.max_seq > trained:
        raise ValueError(f"max_seq {m.max_seq} exceeds the {trained} positions the model "
                         "was trained for")


def _check_token_ids(m: Manifest) -> None:
    vocab = m.model.dims.vocab_size
    bos = () if m.tokenizer.bos_id is None else (m.tokenizer.bos_id,)
    for token in bos + m.tokenizer.eos_ids:
        if not 0 <= token < vocab:
            raise ValueError(f"tokenizer token id {token} is outside the vocabulary [0, {vocab})")
    diffusion = m.model.diffusion
    if diffusion is not None and diffusion.mask_token_id >= vocab:
        raise ValueError(f"mask token id {diffusion.mask_token_id} is outside the vocabulary "
                         f"[0, {vocab})")
    if m.draft_model is not None and m.draft_model.dims.vocab_size != vocab:
        raise ValueError(f"draft_model's vocab_size {m.draft_model.dims.vocab_size} differs from "
                         f"the model's {vocab}")


def _check_full(m: Manifest) -> None:
    if "full" not in m.programs:
        raise ValueError("programs has no 'full' (every policy runs it)")
    built = m.programs["full"].signature["max_seq"]
    if built != m.max_seq:  # the runtime sizes its KV cache by max_seq
        raise ValueError(f"max_seq {m.max_seq} differs from the full program's {built}")


def _check_policies(m: Manifest) -> None:
    for policy in m.policies:
        missing = POLICIES[policy].missing(m)
        if missing is not None:
            raise ValueError(f"policy {policy.value!r} {missing}")
    if m.tuning is not None and m.tuning.chosen.policy not in m.policies:
        raise ValueError(f"tuning chose policy {m.tuning.chosen.policy.value!r}, which the "
                         "engine does not list")


def _check_sections(m: Manifest) -> None:
    for section, needed in _SECTION_NEEDS.items():
        if getattr(m, section) is not None and getattr(m, needed) is None:
            raise ValueError(f"{section} needs {needed}; the manifest has none")
    for section in _SECTION_PROGRAMS:
        if getattr(m, section) is not None:
            _require_programs(m, section, section)
    layers = m.model.dims.num_layers
    if m.exit_layer is not None and not 1 <= m.exit_layer < layers:
        raise ValueError(f"exit_layer {m.exit_layer} is outside 1..{layers - 1} "
                         f"(the model has {layers} layers)")
    if m.skip_choice is not None and m.skip not in m.skip_choice.candidates:
        raise ValueError(f"skip {m.skip!r} is not among skip_choice.candidates")
    if m.heads is not None:
        _check_heads(m.heads)


def _check_heads(heads: HeadsInfo) -> None:
    count = heads.num_heads
    if len(heads.top1) != count or len(heads.top5) != count:
        raise ValueError(f"heads: top1 and top5 need one value per head ({count})")
    if max(map(len, heads.tree), default=0) > count:
        raise ValueError(f"heads: the tree is deeper than the {count} heads")


def _require_programs(m: Manifest, section: str, who: str) -> None:
    for program in _SECTION_PROGRAMS.get(section, lambda _: ())(m):
        if program not in m.programs:
            raise ValueError(f"{who} needs program {program!r}; the manifest has none")


def file_digests(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every file in ``directory`` (trained weights kept in an engine)."""
    return {f.name: sha256_file(f) for f in sorted(directory.iterdir())}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(engine_dir: Path) -> Manifest:
    """Parse and validate ``engine_dir/manifest.json`` and the files it names."""
    path = engine_dir / MANIFEST_FILE
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory {engine_dir} does not exist")
    if not path.is_file():
        raise EngineError(f"{engine_dir} is not a leapc engine (no {MANIFEST_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineError(f"{path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise EngineError(f"{path}: unknown manifest schema version {version!r} "
                          f"(this leapc reads version {SCHEMA_VERSION}); rebuild the engine")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        raise EngineError(f"{path}: invalid manifest{_first_error(err, ' at ')}") from None
    _check_files(engine_dir, manifest)
    return manifest


def _first_error(err: ValidationError, at: str = "") -> str:
    """Pydantic's first error as one line: ``<at>where: what`` (no "Value error, ")."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    ours = first["type"] == "value_error" and "ctx" in first  # a validator's ValueError
    message = str(first["ctx"]["error"]) if ours else first["msg"]
    return f"{at}{where}: {message}" if where else f": {message}"


def _check_files(engine_dir: Path, manifest: Manifest) -> None:
    """Every file the runtime reads from the engine is present and is what was built."""
    tokenizer = manifest.tokenizer
    _check_file(engine_dir, tokenizer.file, tokenizer.sha256, "tokenizer file")
    checked = set()  # (file, digest): a data file the programs share is hashed once
    for name, entry in manifest.programs.items():
        _check_file(engine_dir, entry.file, entry.sha256, f"{name} program file")
        for data, digest in entry.data_files.items():
            if (data, digest) not in checked:
                _check_file(engine_dir, data, digest, f"{name} program data file")
                checked.add((data, digest))
    if manifest.datastore is not None:
        store = manifest.datastore
        for name, digest in store.sha256.items():
            _check_file(engine_dir, f"{store.directory}/{name}", digest, "datastore file")
    for trained, what in ((manifest.heads, "heads"), (manifest.adapter, "adapter")):
        for name, digest in (trained.sha256.items() if trained is not None else ()):
            _check_file(engine_dir, f"{trained.directory}/{name}", digest, f"{what} file")


def _check_file(engine_dir: Path, relpath: str, digest: str, what: str) -> None:
    name = Path(relpath)
    if name.is_absolute() or ".." in name.parts:  # an engine is its directory, moved whole
        raise EngineError(f"{engine_dir}: {what} {relpath} is outside the engine directory")
    file = engine_dir / name
    if not file.is_file():
        raise EngineError(f"{engine_dir}: {what} {relpath} is missing")
    if sha256_file(file) != digest:
        raise EngineError(f"{engine_dir}: {what} {relpath} is corrupt "
                          "(sha256 differs from the manifest)")
