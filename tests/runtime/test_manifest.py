"""``leapc.load`` validates an engine directory fully and refuses a bad one with a clear
`EngineError` (one line, naming what is wrong) before running anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import leapc
from leapc.ir.errors import EngineError
from leapc.runtime.datastore import SUFFIXES_FILE, TOKENS_FILE
from leapc.runtime.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Manifest,
    Policy,
    ProgramEntry,
    read_manifest,
    sha256_file,
)
from leapc.runtime.policies import POLICIES


@pytest.fixture
def engine(engine_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama ORT engine, free to break."""
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir("tiny-llama", "ort"), copy)
    return copy


def manifest_of(engine: Path) -> dict:
    return json.loads((engine / MANIFEST_FILE).read_text())


def write_manifest(engine: Path, data) -> None:
    (engine / MANIFEST_FILE).write_text(json.dumps(data))


def program_file(engine: Path) -> Path:
    return engine / manifest_of(engine)["programs"]["full"]["file"]


def load_error(path: Path, *fragments: str) -> str:
    with pytest.raises(EngineError) as info:
        leapc.load(path)
    message = str(info.value)
    assert "\n" not in message, message  # the CLI prints it as one line
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ------------------------------------------------------------------ the good engine


def test_copied_engine_loads_and_runs(engine, engine_dir):
    loaded = leapc.load(engine)
    assert loaded.manifest.schema_version == SCHEMA_VERSION
    assert loaded.manifest.max_seq == 256
    assert loaded.manifest.backend.value == "ort"
    original = leapc.load(engine_dir("tiny-llama", "ort"))
    prompt = [5, 17, 200]
    assert loaded.generate(prompt, 6).token_ids == original.generate(prompt, 6).token_ids


def test_load_accepts_str_paths(engine):
    assert leapc.load(str(engine)).path == engine


def test_manifest_round_trips(engine, tmp_path):
    manifest = read_manifest(engine)
    manifest.write(engine)
    assert read_manifest(engine) == manifest


# ------------------------------------------------------------------ the directory


def test_missing_directory(tmp_path):
    load_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "does not exist")


def test_file_instead_of_directory(engine):
    load_error(engine / MANIFEST_FILE, "does not exist")


def test_directory_without_manifest(engine):
    (engine / MANIFEST_FILE).unlink()
    load_error(engine, "is not a leapc engine", f"no {MANIFEST_FILE}")


def test_empty_directory(tmp_path):
    load_error(tmp_path, "is not a leapc engine")


# ------------------------------------------------------------------ the manifest


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01garbage", '{"schema_version": 2,'])
def test_manifest_that_is_not_json(engine, text):
    (engine / MANIFEST_FILE).write_text(text)
    load_error(engine, MANIFEST_FILE, "is not valid JSON")


def test_manifest_that_is_not_utf8(engine):
    (engine / MANIFEST_FILE).write_bytes(b"\xff\xfe\xfa{}")
    load_error(engine, MANIFEST_FILE, "is not valid JSON")


@pytest.mark.parametrize("version", [99, 0, 1, "2", None])
def test_unknown_schema_version(engine, version):
    data = manifest_of(engine)
    data["schema_version"] = version
    write_manifest(engine, data)
    message = load_error(engine, "schema version", repr(version), str(SCHEMA_VERSION))
    assert "rebuild" in message


def test_schema_version_99_message(engine):
    data = manifest_of(engine)
    data["schema_version"] = 99
    write_manifest(engine, data)
    load_error(engine, "unknown manifest schema version 99")


def test_manifest_without_schema_version(engine):
    data = manifest_of(engine)
    del data["schema_version"]
    write_manifest(engine, data)
    load_error(engine, "schema version")


@pytest.mark.parametrize("data", [[], "manifest", 1, None])
def test_manifest_that_is_not_an_object(engine, data):
    write_manifest(engine, data)
    load_error(engine, "schema version")


@pytest.mark.parametrize(
    "path",
    [("max_seq",), ("backend",), ("programs",), ("model", "dims"),
     ("model", "max_positions"), ("tokenizer", "eos_ids"), ("tokenizer", "sha256"),
     ("tokenizer", "encode_special_tokens"), ("programs", "full", "sha256")],
    ids=".".join,
)
def test_manifest_with_a_missing_field(engine, path):
    data = manifest_of(engine)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    write_manifest(engine, data)
    load_error(engine, "invalid manifest", ".".join(path), "Field required")


@pytest.mark.parametrize(
    "key, value, fragments",
    [("max_seq", "many", ("max_seq", "integer")),
     ("backend", "tensorrt-9", ("backend",)),
     ("policies", ["warp-drive"], ("policies",)),
     ("unexpected_field", 1, ("unexpected_field", "Extra inputs"))],
)
def test_manifest_with_a_bad_field(engine, key, value, fragments):
    data = manifest_of(engine)
    data[key] = value
    write_manifest(engine, data)
    load_error(engine, "invalid manifest", *fragments)


# ------------------------------------------------------------------ the files it names


def test_program_file_deleted(engine):
    name = program_file(engine).name
    program_file(engine).unlink()
    load_error(engine, "full program file", name, "is missing")


def test_program_file_with_one_byte_flipped(engine):
    path = program_file(engine)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    load_error(engine, path.name, "corrupt", "sha256")


def test_program_file_truncated(engine):
    path = program_file(engine)
    path.write_bytes(path.read_bytes()[:100])
    load_error(engine, path.name, "corrupt", "sha256")


def test_program_garbage_with_matching_hash_fails_to_load_cleanly(engine):
    """Hash checks pass but the file is not ONNX: still an EngineError, not an ORT exception."""
    from leapc.runtime.manifest import sha256_file

    path = program_file(engine)
    path.write_bytes(b"this is not an onnx model" * 10)
    data = manifest_of(engine)
    data["programs"]["full"]["sha256"] = sha256_file(path)
    write_manifest(engine, data)
    load_error(engine, "program 'full' cannot be loaded")


def test_tokenizer_deleted(engine):
    (engine / "tokenizer.json").unlink()
    load_error(engine, "tokenizer file tokenizer.json is missing")


@pytest.mark.parametrize("absolute", [False, True], ids=["dot-dot", "absolute"])
def test_files_outside_the_engine_are_refused(engine, absolute):
    """Even with the right digest: the engine is its directory, copied or moved whole."""
    outside = engine.parent / "tokenizer.json"
    shutil.copyfile(engine / "tokenizer.json", outside)
    where = str(outside) if absolute else "../tokenizer.json"
    data = manifest_of(engine)
    data["tokenizer"]["file"] = where
    write_manifest(engine, data)
    load_error(engine, f"tokenizer file {where} is outside the engine directory")


def test_the_tokenizer_is_hashed_at_build(engine):
    assert manifest_of(engine)["tokenizer"]["sha256"] == sha256_file(engine / "tokenizer.json")


def test_tokenizer_tampered(engine):
    """Still a valid tokenizer, but not the build's: it would encode prompts differently."""
    path = engine / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["5"], vocab["6"] = vocab["6"], vocab["5"]
    path.write_text(json.dumps(data))
    load_error(engine, "tokenizer file tokenizer.json", "corrupt", "sha256")


@pytest.mark.parametrize("garbage", [b"not a tokenizer", b'{"version": "1.0"}', b"\xff\x00\x13"])
def test_tokenizer_garbage_with_matching_hash(engine, garbage):
    """The hash passes but the file is no tokenizer: still an EngineError."""
    (engine / "tokenizer.json").write_bytes(garbage)
    data = manifest_of(engine)
    data["tokenizer"]["sha256"] = sha256_file(engine / "tokenizer.json")
    write_manifest(engine, data)
    load_error(engine, "tokenizer file is corrupt")


def test_a_programs_external_data_is_hashed_and_checked(engine):
    """ONNX programs over 2 GB keep their weights in ``<file>.data``: the entry hashes it
    and a tampered one is refused like the program itself."""
    data = program_file(engine).with_name(program_file(engine).name + ".data")
    data.write_bytes(b"external weights")
    signature = manifest_of(engine)["programs"]["full"]["signature"]
    entry = ProgramEntry.of(program_file(engine), signature)
    assert entry.data_files == {data.name: sha256_file(data)}
    manifest = manifest_of(engine)
    manifest["programs"]["full"]["data_files"] = entry.data_files
    write_manifest(engine, manifest)
    leapc.load(engine)
    data.write_bytes(b"external weightz")
    load_error(engine, "full program data file", data.name, "corrupt")
    data.unlink()
    load_error(engine, data.name, "missing")


def test_validation_comes_before_loading(engine, monkeypatch):
    """A bad manifest is refused before any program or tokenizer is opened."""
    import leapc.runtime.engine as engine_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the program was loaded before the manifest was validated")

    monkeypatch.setattr(engine_module, "load_program", forbidden)
    monkeypatch.setattr(engine_module, "Tokenizer", SimpleNamespace(from_file=forbidden))
    program_file(engine).unlink()
    load_error(engine, "is missing")


# ------------------------------------------------------------------ fields that must agree

# Every section the tiny engine lacks, filled in by hand (its programs are copies of the
# full one, so their hashes hold): the manifest every cross-field rule is broken from.
EXTRA_PROGRAMS = ("draft_model", "heads", "draft", "remainder", "kangaroo", "skip_0", "skip_1")
SECTIONS = {
    "datastore": {"source": "test", "documents": 1, "tokens": 10, "depth": 4},
    "heads": {"kind": "hydra", "num_heads": 2, "num_blocks": 1, "placement": "program",
              "tree": [[0], [0, 0]], "tree_choice": {"source": "default"},
              "top1": [0.5, 0.4], "top5": [0.9, 0.8], "sha256": {}},
    "exit_layer": 1,
    "exit_choice": {"source": "given", "depth": 3},
    "adapter": {"steps": 1, "seconds": 1.0, "agreement_before": 0.5, "agreement_after": 0.6,
                "depth": 2, "confidence": 0.3, "ar_tokens_per_s": 100.0, "sweep": [],
                "sha256": {}},
    "skip": "a1",
    "skip_choice": {"source": "given", "depth": 3, "candidates": ["m0", "a1"]},
}
# every autoregressive policy but Medusa's (the complete engine's heads are Hydra's)
EVERY_POLICY = [p.value for p in Policy if POLICIES[p].unmasking is None
                and p not in (Policy.MEDUSA, Policy.MEDUSA_DYNAMIC)]


@pytest.fixture
def complete(engine) -> Path:
    """The tiny engine with every section and every policy (heads: Hydra's) in its manifest."""
    data = manifest_of(engine)
    full = data["programs"]["full"]
    for name in EXTRA_PROGRAMS:
        shutil.copyfile(engine / full["file"], engine / f"{name}.onnx")
        data["programs"][name] = full | {"file": f"{name}.onnx"}
    store = engine / "datastore"
    store.mkdir()
    for name in (TOKENS_FILE, SUFFIXES_FILE):  # read only by retrieval requests, never here
        (store / name).write_bytes(name.encode())
    data |= SECTIONS | {"draft_model": data["model"], "policies": EVERY_POLICY}
    data["datastore"]["sha256"] = {f.name: sha256_file(f) for f in store.iterdir()}
    write_manifest(engine, data)
    return engine


def test_a_manifest_with_every_section_and_policy_is_valid(complete):
    """The baseline of the breaks below: each of them differs from this by one edit."""
    manifest = read_manifest(complete)
    assert {p.value for p in manifest.policies} == set(EVERY_POLICY)
    assert set(manifest.programs) == {"full", *EXTRA_PROGRAMS}


def _drop(*path):
    def edit(data):
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    return edit


def _set(*path, value):
    def edit(data):
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    return edit


def _without_policies(*policies):
    return _set("policies", value=[p for p in EVERY_POLICY if p not in policies])


def _both(*edits):
    def edit(data):
        for one in edits:
            one(data)
    return edit


BREAKS = {
    # the limits
    "max_new-0": (_set("max_new", value=0), "max_new must be at least 1"),
    "max_new-is-max_seq": (_set("max_new", value=256), "below max_seq 256"),
    "max_seq-past-trained-positions": (_set("model", "max_positions", value=128),
                                       "max_seq 256 exceeds the 128 positions"),
    "max_seq-not-the-programs": (_set("programs", "full", "signature", "max_seq", value=128),
                                 "differs from the full program's 128"),
    # token ids
    "bos-past-vocab": (_set("tokenizer", "bos_id", value=256),
                       "token id 256 is outside the vocabulary [0, 256)"),
    "eos-negative": (_set("tokenizer", "eos_ids", value=[3, -1]), "token id -1 is outside"),
    "draft-vocab": (_set("draft_model", "dims", "vocab_size", value=300), "draft_model's vocab_size 300"),
    # every policy's sections and programs
    "no-full": (_drop("programs", "full"), "programs has no 'full'"),
    "draft-no-model": (_set("draft_model", value=None), "policy 'draft' needs draft_model"),
    "draft-no-program": (_drop("programs", "draft_model"),
                         "policy 'draft' needs program 'draft_model'"),
    "retrieval-no-datastore": (_set("datastore", value=None),
                               "policy 'retrieval' needs datastore"),
    "datastore-file-unhashed": (_drop("datastore", "sha256", "tokens.npy"),
                                "datastore.sha256: no digest of tokens.npy"),
    "hydra-no-heads": (_set("heads", value=None), "policy 'hydra' needs heads"),
    "hydra-no-program": (_drop("programs", "heads"), "policy 'hydra' needs program 'heads'"),
    "medusa-with-hydra-heads": (_set("policies", value=EVERY_POLICY + ["medusa"]),
                                "policy 'medusa' needs medusa heads (the engine's are hydra)"),
    "early-exit-no-layer": (_set("exit_layer", value=None),
                            "policy 'early-exit' needs exit_layer"),
    "early-exit-no-draft": (_drop("programs", "draft"),
                            "policy 'early-exit' needs program 'draft'"),
    "early-exit-no-remainder": (_drop("programs", "remainder"),
                                "policy 'early-exit' needs program 'remainder'"),
    "kangaroo-no-adapter": (_set("adapter", value=None), "policy 'kangaroo' needs adapter"),
    "kangaroo-no-program": (_drop("programs", "kangaroo"),
                            "policy 'kangaroo' needs program 'kangaroo'"),
    "layer-skip-no-skip": (_set("skip", value=None), "policy 'layer-skip' needs skip"),
    "swift-no-choice": (_both(_set("skip_choice", value=None), _without_policies("layer-skip")),
                        "policy 'swift' needs skip_choice"),
    "swift-no-candidate-program": (_drop("programs", "skip_1"), "needs program 'skip_1'"),
    "diffusion-policy-on-autoregressive": (_set("policies", value=EVERY_POLICY + ["mdm"]),
                                           "policy 'mdm' needs a block-diffusion model"),
    "autoregressive-policy-on-diffusion": (
        _set("model", "diffusion", value={"block_size": 4, "mask_token_id": 0,
                                          "logits_shift": 1}),
        "policy 'ar' needs an autoregressive model"),
    "mask-id-past-vocab": (_both(_set("model", "diffusion", value={
        "block_size": 4, "mask_token_id": 256, "logits_shift": 1}), _set("policies", value=["mdm"])),
        "mask token id 256 is outside the vocabulary [0, 256)"),
    "int8-drafting": (_set("quantization", value="int8"),
                      "policy 'lookup' needs float weights or --attention kernel|invariant to "
                      "draft"),
    # sections without their policies (as int8 engines keep them) or out of range
    "exit-no-draft-unused": (_both(_drop("programs", "draft"),
                                   _without_policies("early-exit", "kangaroo")),
                             "exit_layer needs program 'draft'"),
    "exit-choice-no-layer": (_both(_set("exit_layer", value=None), _set("adapter", value=None),
                                   _without_policies("early-exit", "kangaroo")),
                             "exit_choice needs exit_layer"),
    "adapter-no-layer": (_both(_set("exit_layer", value=None), _set("exit_choice", value=None),
                               _without_policies("early-exit", "kangaroo")),
                         "adapter needs exit_layer"),
    "exit-layer-past-the-model": (_set("exit_layer", value=2), "exit_layer 2 is outside 1..1"),
    "skip-not-a-candidate": (_set("skip", value="m1"), "skip 'm1' is not among"),
    "heads-tree-too-deep": (_set("heads", "tree", value=[[0], [0, 0], [0, 0, 0]]),
                            "deeper than the 2 heads"),
    "heads-top1-short": (_set("heads", "top1", value=[0.5]), "one value per head (2)"),
    # what the runtime reads from fields
    "unknown-dtype": (_set("model", "dims", "dtype", value="float99"), "unknown dtype 'float99'"),
    "signature-without-outputs": (_drop("programs", "draft", "signature", "outputs"),
                                  "programs.draft.signature: outputs: Field required"),
    "signature-shape-code": (_set("programs", "full", "signature", "inputs", 0, "shape", 0,
                                  value="__import__('os')"),
                             "programs.full.signature: inputs.0.shape.0: String should match"),
}


@pytest.mark.parametrize("name", BREAKS)
def test_a_manifest_whose_fields_disagree_is_refused(complete, name):
    edit, fragment = BREAKS[name]
    data = manifest_of(complete)
    edit(data)
    write_manifest(complete, data)
    with pytest.raises(EngineError) as info:
        read_manifest(complete)
    message = str(info.value)
    assert "\n" not in message and "invalid manifest" in message, message
    assert fragment in message, (fragment, message)
    assert "Value error" not in message, message


def test_the_rules_hold_for_a_manifest_built_in_python(complete):
    """Not only for JSON read from disk: a Manifest made in code is checked the same way."""
    data = manifest_of(complete)
    data["max_new"] = 0
    with pytest.raises(ValueError, match="max_new must be at least 1"):
        Manifest.model_validate(data)
