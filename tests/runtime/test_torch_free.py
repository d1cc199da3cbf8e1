"""An ORT engine runs with numpy + onnxruntime + tokenizers only: torch and transformers
cannot even be imported in the process (DESIGN §1, the edge-deployment contract)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import leapc

BLOCKER = textwrap.dedent(
    """
    import sys

    BLOCKED = {"torch", "transformers"}

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the ORT run path must not import it")
            return None

    sys.meta_path.insert(0, BlockTorch())
    assert not BLOCKED & set(sys.modules), "imported before the blocker was installed"
    """
)

CHECKS = textwrap.dedent(
    """
    assert "torch" not in sys.modules, "torch was imported"
    assert "transformers" not in sys.modules, "transformers was imported"
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block torch")
    """
)

GENERATE = BLOCKER + textwrap.dedent(
    """
    import json
    import leapc

    engine = leapc.load(sys.argv[1])
    generation = engine.generate(json.loads(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(generation.token_ids))
    """
) + CHECKS

CLI = BLOCKER + textwrap.dedent(
    """
    from leapc.cli import main

    try:
        main(sys.argv[1:])
    finally:
    """
) + textwrap.indent(CHECKS, "    ")

CASES = [("stories", "", 20), ("tiny-llama", [5, 17, 200], 20)]


def run_python(code: str, *args: str, cwd) -> subprocess.CompletedProcess:
    # cwd: not the repository root, where ``import leapc`` would find the bare folder
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "LEAPC_THREADS": "1"})


@pytest.mark.parametrize("key, prompt, new", CASES, ids=[c[0] for c in CASES])
def test_ort_engine_generates_without_torch(engine_dir, tmp_path, key, prompt, new):
    engine = engine_dir(key, "ort")
    result = run_python(GENERATE, str(engine), json.dumps(prompt), str(new), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token_ids = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(token_ids) == new
    assert token_ids == leapc.load(engine).generate(prompt, new).token_ids


def test_cli_run_without_torch(engine_dir, tmp_path):
    engine = engine_dir("tiny-llama", "ort")
    result = run_python(CLI, "run", str(engine), "--prompt-ids", "1,2,3", "--max-new-tokens",
                        "10", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["token_ids"] == leapc.load(engine).generate([1, 2, 3], 10).token_ids


def test_cli_user_error_without_torch(engine_dir, tmp_path):
    """Refusing a bad engine needs no torch either (and stays a one-line error)."""
    result = run_python(CLI, "run", str(tmp_path / "nowhere"), "--prompt", "x", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")
    assert "does not exist" in result.stderr


def test_blocker_is_effective(tmp_path):
    """The snippet's finder really makes ``import torch`` fail (the test above is not vacuous)."""
    result = run_python(BLOCKER + "import torch\n", cwd=tmp_path)
    assert result.returncode != 0
    assert "torch is blocked" in result.stderr


def test_backend_table_covers_every_backend():
    from leapc.runtime.backends.base import BACKENDS, Compression
    from leapc.runtime.manifest import Backend

    assert set(BACKENDS) == set(Backend)
    assert [BACKENDS[b].name for b in Backend] == list(Backend)
    assert BACKENDS[Backend.ORT].compresses == set(Compression) - {Compression.NONE}


def test_backend_table_resolves_without_torch(tmp_path):
    """Every backend's entry (and the ORT loader) resolves with torch blocked: only
    ``lower`` and the torch backends' ``load`` import it."""
    code = BLOCKER + textwrap.dedent(
        """
        from leapc.runtime.backends.base import BACKENDS
        from leapc.runtime.manifest import Backend

        impls = [BACKENDS[b] for b in Backend]
        assert callable(BACKENDS[Backend.ORT].load)
        """
    ) + CHECKS
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_server_app_builds_without_torch(engine_dir, tmp_path):
    """`leapc serve` needs the torch-free runtime only (plus FastAPI)."""
    pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'leapc[serve]')")
    code = BLOCKER + textwrap.dedent(
        """
        import leapc
        from leapc.runtime.serving.app import ServeConfig, create_app

        create_app(leapc.load(sys.argv[1]), ServeConfig("tiny", "ar"))
        """
    ) + CHECKS
    result = run_python(code, str(engine_dir("tiny-llama", "ort")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
