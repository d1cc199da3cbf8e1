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
from leapc.runtime.manifest import MANIFEST_FILE, SCHEMA_VERSION, read_manifest


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


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01garbage", '{"schema_version": 1,'])
def test_manifest_that_is_not_json(engine, text):
    (engine / MANIFEST_FILE).write_text(text)
    load_error(engine, MANIFEST_FILE, "is not valid JSON")


def test_manifest_that_is_not_utf8(engine):
    (engine / MANIFEST_FILE).write_bytes(b"\xff\xfe\xfa{}")
    load_error(engine, MANIFEST_FILE, "is not valid JSON")


@pytest.mark.parametrize("version", [99, 0, 2, "1", None])
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
    [("max_seq",), ("backend",), ("programs",), ("model", "vocab_size"),
     ("tokenizer", "eos_ids"), ("programs", "full", "sha256")],
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


@pytest.mark.parametrize("garbage", [b"not a tokenizer", b'{"version": "1.0"}', b"\xff\x00\x13"])
def test_tokenizer_garbage(engine, garbage):
    (engine / "tokenizer.json").write_bytes(garbage)
    load_error(engine, "tokenizer file is corrupt")


def test_validation_comes_before_loading(engine, monkeypatch):
    """A bad manifest is refused before any program or tokenizer is opened."""
    import leapc.runtime.engine as engine_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the program was loaded before the manifest was validated")

    monkeypatch.setattr(engine_module, "_load_step", forbidden)
    monkeypatch.setattr(engine_module, "Tokenizer", SimpleNamespace(from_file=forbidden))
    program_file(engine).unlink()
    load_error(engine, "is missing")
