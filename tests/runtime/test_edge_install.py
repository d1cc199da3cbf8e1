"""`pip install leapc[runtime]` is an edge runtime: a fresh virtualenv with that extra only
(no torch, no transformers) runs an engine built beforehand, token for token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import leapc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.install


def sh(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                               "OMP_NUM_THREADS": "1", "LEAPC_THREADS": "1"})


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("edge") / "venv"
    made = sh(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    installed = sh(venv / "bin" / "pip", "install", "-q", f"{ROOT}[runtime]")
    if installed.returncode != 0 and "Could not find a version" in installed.stderr:
        pytest.skip(f"the package registry is unreachable: {installed.stderr.strip()[-200:]}")
    assert installed.returncode == 0, installed.stderr
    return venv


def test_the_runtime_extra_installs_no_torch(runtime_venv):
    listed = sh(runtime_venv / "bin" / "pip", "list", "--format", "json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"leapc", "onnxruntime", "numpy", "tokenizers", "pydantic"} <= names
    assert not names & {"torch", "transformers", "onnx", "onnxscript", "triton"}, names


def test_an_engine_runs_token_identically_without_torch(runtime_venv, engine_dir):
    engine = engine_dir("tiny-llama", "ort")
    result = sh(runtime_venv / "bin" / "leapc", "run", engine, "--prompt-ids", "5,17,200",
                "--max-new-tokens", "16", "--policy", "lookup", "--json")
    assert result.returncode == 0, result.stderr
    expected = leapc.load(engine).generate([5, 17, 200], 16).token_ids
    assert json.loads(result.stdout)["token_ids"] == expected


def test_building_on_the_runtime_install_says_what_to_install(runtime_venv, tmp_path):
    result = sh(runtime_venv / "bin" / "leapc", "build", "bundled", "-o", tmp_path / "engine")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: this needs the compiler dependencies (torch is not "
                                     "installed): pip install 'leapc[compile]'")
