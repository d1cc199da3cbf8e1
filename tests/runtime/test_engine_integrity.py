"""An engine is validated whole: it encodes prompts as the build did, the build refuses
limits the model was not trained for, and `leapc inspect` refuses a broken engine like
`leapc run` does (exit 2, one ``error:`` line)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engines import STORIES_BIN, require_bundled, require_stories, tiny_source
from families import MAX_POSITIONS

import leapc
from leapc.ir.errors import InputError
from leapc.models.loaders import load_source
from leapc.runtime.manifest import MANIFEST_FILE

LEAPC = Path(sys.executable).with_name("leapc")

# Typed text that spells special tokens; llama2.c's are <s> / </s>, the bundled model's
# <|bos|> / <|eos|> / <|pad|>.
SPECIAL_PROMPTS = [
    "Once upon a time </s> there was <s> a cat",
    "</s>",
    "<s><unk></s>",
    "x = 1  # <|eos|> then <|bos|> and <|pad|>",
]


# ------------------------------------------------------------------ run-time encoding


def _encodings(engine_dir, key: str, source_spec) -> tuple[list, list, leapc.Engine]:
    engine = leapc.load(engine_dir(key, "ort"))
    build_time = load_source(source_spec).tokenizer  # as the build's SourceModel has it
    return ([build_time.encode(p).ids for p in SPECIAL_PROMPTS],
            [engine.encode(p) for p in SPECIAL_PROMPTS], engine)


@pytest.mark.slow
@pytest.mark.shared
def test_llama2c_typed_special_tokens_encode_as_at_build(engine_dir):
    """llama2.c keeps typed "</s>" as text (encode_special_tokens), a flag tokenizer.json
    does not hold: the manifest carries it to the loaded engine's tokenizer."""
    require_stories()  # skips, with the reason, without ../shared
    built, loaded, engine = _encodings(engine_dir, "stories", STORIES_BIN)
    assert engine.manifest.tokenizer.encode_special_tokens is True
    assert loaded == built
    eos = engine.manifest.tokenizer.eos_ids[0]
    assert eos not in loaded[1], "typed </s> became the EOS control token"


@pytest.mark.slow
def test_bundled_typed_special_tokens_encode_as_at_build(engine_dir):
    require_bundled()
    built, loaded, engine = _encodings(engine_dir, "bundled", "bundled")
    assert engine.manifest.tokenizer.encode_special_tokens is False
    assert loaded == built


# ------------------------------------------------------------------ the build's limits


def test_build_refuses_max_seq_past_the_trained_positions(tmp_path):
    with pytest.raises(InputError) as info:
        leapc.build(tiny_source("llama"), tmp_path / "e", "ort", max_seq=MAX_POSITIONS + 1)
    message = str(info.value)
    assert "\n" not in message
    assert f"max-seq {MAX_POSITIONS + 1} exceeds the {MAX_POSITIONS} positions" in message


@pytest.mark.parametrize("max_seq, max_new, fragment", [
    (0, 16, "max-seq must be at least 2 (got 0)"),  # not taken for "no max-seq given"
    (64, 0, "max-new must be at least 1 (got 0)"),
])
def test_build_refuses_limits_with_no_room(tmp_path, max_seq, max_new, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        leapc.build(tiny_source("llama"), tmp_path / "e", "ort", max_seq=max_seq,
                    max_new=max_new)


def test_the_trained_positions_are_recorded(engine_dir):
    manifest = leapc.load(engine_dir("tiny-llama", "ort")).manifest
    assert manifest.model.max_positions == MAX_POSITIONS


# ------------------------------------------------------------------ leapc inspect


@pytest.fixture
def broken(engine_dir, tmp_path) -> Path:
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir("tiny-llama", "ort"), copy)
    return copy


def inspect(engine: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run([str(LEAPC), "inspect", str(engine)], capture_output=True,
                          text=True, timeout=240, env=env)


def inspect_error(engine: Path, *fragments: str) -> None:
    """Exit 2, one ``error:`` line on stderr naming ``fragments``, no traceback, no report."""
    result = inspect(engine)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def edit_manifest(engine: Path, edit) -> None:
    data = json.loads((engine / MANIFEST_FILE).read_text())
    edit(data)
    (engine / MANIFEST_FILE).write_text(json.dumps(data))


def test_inspect_of_a_good_engine_reports(broken):
    result = inspect(broken)
    assert result.returncode == 0, result.stderr
    assert "step signature · full" in result.stdout


def test_inspect_refuses_a_tampered_tokenizer(broken):
    path = broken / "tokenizer.json"
    path.write_text(path.read_text().replace('"17": 17', '"17": 18', 1))
    inspect_error(broken, "tokenizer file tokenizer.json", "corrupt")


def test_inspect_refuses_a_manifest_whose_fields_disagree(broken):
    edit_manifest(broken, lambda data: data.update(max_new=0))
    inspect_error(broken, "invalid manifest", "max_new must be at least 1")


def test_inspect_refuses_a_signature_it_cannot_read(broken):
    """A shape of the allowed characters that is no expression: refused, not a traceback."""
    def edit(data):
        data["programs"]["full"]["signature"]["inputs"][0]["shape"][0] = "B +"
    edit_manifest(broken, edit)
    inspect_error(broken, "program 'full'", "step signature cannot be read")
