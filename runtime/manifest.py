"""The engine manifest: a versioned, validated description of an engine directory.

No torch here: the ONNX run path reads manifests on machines that have no torch.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from leapc.ir.errors import EngineError
from leapc.ir.head_spec import HeadKind, HeadPlacement

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"


class Backend(str, enum.Enum):
    EAGER = "eager"
    ORT = "ort"
    AOTI = "aoti"
    TENSORRT = "tensorrt"  # Torch-TensorRT; needs CUDA


class Policy(str, enum.Enum):
    AR = "ar"
    LOOKUP = "lookup"  # prompt lookup (training-free, any engine)
    RECYCLE = "recycle"  # token recycling (training-free, any engine)
    DRAFT = "draft"  # a draft model in its own program and KV cache (build --draft-model)
    LOOKAHEAD = "lookahead"  # Jacobi lookahead decoding (training-free, any engine)
    RETRIEVAL = "retrieval"  # REST datastore + prompt lookup (build --datastore)
    MEDUSA = "medusa"  # Medusa heads, static tree (build --heads K)
    MEDUSA_DYNAMIC = "medusa-dynamic"  # Medusa heads, EAGLE-2 dynamic tree
    HYDRA = "hydra"  # Hydra heads, static tree (build --heads K --head-kind hydra)
    HYDRA_DYNAMIC = "hydra-dynamic"  # Hydra heads, EAGLE-2 dynamic tree
    EARLY_EXIT = "early-exit"  # LayerSkip self-speculation from layer E's exit (build --exit-layer)
    KANGAROO = "kangaroo"  # exit + trained adapter, stop below a top-1 confidence (--train-adapter)
    LAYER_SKIP = "layer-skip"  # the model with some sublayers bypassed drafts (build --skip)
    SWIFT = "swift"  # layer skip choosing among the engine's skip sets while generating


HEAD_POLICIES = {HeadKind.MEDUSA: (Policy.MEDUSA, Policy.MEDUSA_DYNAMIC),
                 HeadKind.HYDRA: (Policy.HYDRA, Policy.HYDRA_DYNAMIC)}


class Quantization(str, enum.Enum):
    NONE = "none"  # weights as the model stores them (float32 here)
    INT8 = "int8"  # MatMul weights int8 per 32-row block (ORT MatMulNBits), int8 compute


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelInfo(_Frozen):
    source: str  # what was built: "bundled", or the model's path (for `bench --vs-hf`)
    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: str
    weights_sha256: str


class TokenizerInfo(_Frozen):
    file: str = "tokenizer.json"
    bos_id: int | None
    eos_ids: tuple[int, ...]


class ProgramEntry(_Frozen):
    file: str
    sha256: str
    signature: dict  # StepSignature.to_json(); shapes as strings of B, N, T


class DatastoreInfo(_Frozen):
    """The retrieval policy's corpus: a token stream and its suffix array (two .npy files)."""

    directory: str = "datastore"
    source: str  # what it was built from: "bundled" (the bundled model's corpus) or paths
    documents: int
    tokens: int
    depth: int  # suffixes are sorted on this many leading tokens
    sha256: dict[str, str]  # file name -> digest


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


class Manifest(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
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
    tokenizer: TokenizerInfo
    programs: dict[str, ProgramEntry]  # "full", "draft_model", "heads", "draft", "remainder",
    # "kangaroo", "skip_<i>"
    passes: tuple[str, ...]
    anatomy: tuple[tuple[str, str], ...] = ()  # landmark -> graph node, for `leapc inspect`
    addons: dict[str, str] = {}
    policies: tuple[Policy, ...]
    max_seq: int
    max_batch: int
    max_new: int

    def write(self, engine_dir: Path) -> None:
        (engine_dir / MANIFEST_FILE).write_text(self.model_dump_json(indent=2))


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
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EngineError(f"{path}: invalid manifest at {where}: {first['msg']}") from None
    _check_files(engine_dir, manifest)
    return manifest


def _check_files(engine_dir: Path, manifest: Manifest) -> None:
    tokenizer = engine_dir / manifest.tokenizer.file
    if not tokenizer.is_file():
        raise EngineError(f"{engine_dir}: tokenizer file {manifest.tokenizer.file} is missing")
    for name, entry in manifest.programs.items():
        _check_file(engine_dir, entry.file, entry.sha256, f"{name} program file")
    if manifest.datastore is not None:
        store = manifest.datastore
        for name, digest in store.sha256.items():
            _check_file(engine_dir, f"{store.directory}/{name}", digest, "datastore file")
    for trained, what in ((manifest.heads, "heads"), (manifest.adapter, "adapter")):
        for name, digest in (trained.sha256.items() if trained is not None else ()):
            _check_file(engine_dir, f"{trained.directory}/{name}", digest, f"{what} file")


def _check_file(engine_dir: Path, relpath: str, digest: str, what: str) -> None:
    file = engine_dir / relpath
    if not file.is_file():
        raise EngineError(f"{engine_dir}: {what} {relpath} is missing")
    if sha256_file(file) != digest:
        raise EngineError(f"{engine_dir}: {what} {relpath} is corrupt "
                          "(sha256 differs from the manifest)")
