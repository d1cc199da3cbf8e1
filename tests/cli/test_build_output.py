"""`leapc build -o PATH` never destroys data: what it refuses, how it replaces an engine,
and what a killed, interrupted or concurrent build leaves behind.

Builds run as subprocesses of a tiny Hugging Face checkpoint (a few seconds each), so
signals reach a real build exactly as a user's would.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from engines import id_tokenizer
from families import tiny_checkpoint
from test_cli import LEAPC, cli, user_error

import leapc
from leapc.engine_output import check_output, staged_output
from leapc.ir.errors import InputError

# Every case but the lock's starts `leapc build` processes (~5 s each: torch's import).
pytestmark = pytest.mark.slow

PROMPT = "1,2,3,4"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Llama as a user brings it: a Hugging Face directory with tokenizer.json."""
    directory = tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-hf"))
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    id_tokenizer(vocab).save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory) -> Path:
    """An engine built by the CLI, kept pristine: tests copy it before touching it."""
    out = tmp_path_factory.mktemp("built") / "engine"
    result = cli("build", model, "-o", out, "--backend", "ort", "--max-seq", "64")
    assert result.returncode == 0, result.stderr
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def greedy(engine_path: Path) -> list[int]:
    return leapc.load(engine_path).generate([1, 2, 3, 4], max_new_tokens=8).token_ids


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".leapc-" in p.name)


# --------------------------------------------------------------------------- refusals


def test_dot_in_a_directory_with_a_file_is_refused_and_the_file_stays(model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = subprocess.run([LEAPC, "build", str(model), "-o", "."], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    user_error(result, "current directory")
    assert snapshot(tmp_path) == {"notes.txt": b"mine"}


def test_empty_output_path_is_refused(model, tmp_path):
    result = subprocess.run([LEAPC, "build", str(model), "-o", ""], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    user_error(result)
    assert not any(tmp_path.iterdir())


def test_a_directory_with_other_files_is_refused_untouched(model, tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "data.csv").write_text("1,2")
    (tmp_path / "out" / "sub" / "x").write_text("y")
    before = snapshot(tmp_path)
    user_error(cli("build", model, "-o", tmp_path / "out"), "not a leapc engine")
    assert snapshot(tmp_path) == before


def test_the_directory_holding_the_source_model_is_refused(model, tmp_path):
    copy = tmp_path / "checkpoint"
    copy.mkdir()
    for file in model.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    before = snapshot(copy)
    user_error(cli("build", copy, "-o", copy, "--force"), "input")
    user_error(cli("build", copy, "-o", tmp_path), "input")
    assert snapshot(copy) == before


def test_an_output_under_a_file_is_refused(model, tmp_path):
    (tmp_path / "file").write_text("x")
    user_error(cli("build", model, "-o", tmp_path / "file" / "engine"), "not a directory")
    user_error(cli("build", model, "-o", tmp_path / "file"), "not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_an_unwritable_location_is_refused(model):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc (a directory nobody, root included, can write in)")
    user_error(cli("build", model, "-o", "/proc/leapc-test/engine"), "cannot write")


def test_an_engine_is_replaced_only_with_force(engine, model, tmp_path):
    target = tmp_path / "engine"
    shutil.copytree(engine, target)
    before = snapshot(target)
    user_error(cli("build", model, "-o", target, "--backend", "eager"), "--force")
    assert snapshot(target) == before
    result = cli("build", model, "-o", target, "--backend", "eager", "--max-seq", "64",
                 "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads((target / "manifest.json").read_text())["backend"] == "eager"
    assert not (target / "full.onnx").exists()  # nothing of the old engine is mixed in
    assert greedy(target) == greedy(engine)
    assert leftovers(tmp_path) == []


def test_an_engine_holding_a_users_file_is_not_replaced_even_with_force(engine, model, tmp_path):
    target = tmp_path / "engine"
    shutil.copytree(engine, target)
    (target / "results.md").write_text("my benchmark notes")
    before = snapshot(target)
    user_error(cli("build", model, "-o", target, "--force"), "results.md")
    assert snapshot(target) == before


def test_an_empty_directory_is_filled(model, tmp_path):
    (tmp_path / "engine").mkdir()
    result = cli("build", model, "-o", tmp_path / "engine", "--backend", "eager",
                 "--max-seq", "64")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "engine" / "manifest.json").is_file()


# --------------------------------------------------------------------------- the lock


def test_a_second_build_of_the_same_path_is_refused_while_one_runs(tmp_path):
    target = tmp_path / "engine"
    with staged_output(target, force=False) as staging:
        (staging / "manifest.json").write_text('{"schema_version": 1, "programs": {}}')
        with pytest.raises(InputError, match="another build is writing"):
            with staged_output(target, force=False):
                pass
    assert (target / "manifest.json").is_file()
    assert leftovers(tmp_path) == []


def test_a_failed_build_leaves_the_old_engine_and_no_staging(engine, tmp_path):
    target = tmp_path / "engine"
    shutil.copytree(engine, target)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="lowering failed"):
        with staged_output(target, force=True) as staging:
            (staging / "manifest.json").write_text("{}")
            raise RuntimeError("lowering failed")
    assert snapshot(target) == before
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- signals


def start_build(model: Path, target: Path) -> subprocess.Popen:
    """A rebuild of the (ORT) engine at ``target`` on the eager backend: other files, so a
    mix of old and new would show."""
    return subprocess.Popen([LEAPC, "build", str(model), "-o", str(target), "--backend",
                             "eager", "--max-seq", "64", "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def killed_at_exit(process: subprocess.Popen):
    """SIGKILL ``process`` if it still runs when the block ends: a test that fails while
    it waits (a signal ignored, a timeout) must not leave a `leapc bench --repeats 100000`
    spinning on the cores for the rest of the run."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def interrupt(process: subprocess.Popen, attempts: int = 10) -> str:
    """Ctrl-C ``process`` as a user does, again every few seconds until it exits (one that
    lands while a C extension initialises can be swallowed by its attribute lookups, as
    CPython allows); its stderr."""
    for _ in range(attempts):
        process.send_signal(signal.SIGINT)
        try:
            return process.communicate(timeout=6)[1]
        except subprocess.TimeoutExpired:
            continue
    raise AssertionError(f"{attempts} SIGINTs did not stop {process.args}")


def wait_for_staging(parent: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the build has started writing (its staging directory exists)."""
    deadline = time.monotonic() + timeout
    while not any(".leapc-build-" in name for name in leftovers(parent)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_rebuild_exits_130_and_keeps_the_old_engine(engine, model, tmp_path,
                                                                        sig):
    target = tmp_path / "engine"
    shutil.copytree(engine, target)
    before, output = snapshot(target), greedy(target)
    build = start_build(model, target)
    with killed_at_exit(build):
        wait_for_staging(tmp_path, build)
        build.send_signal(sig)
        _, stderr = build.communicate(timeout=120)
    assert build.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted"
    assert snapshot(target) == before and greedy(target) == output
    assert leftovers(tmp_path) == []


def test_killing_a_build_at_random_moments_leaves_the_old_engine_or_the_new(engine, model,
                                                                           tmp_path):
    """SIGKILL (no cleanup possible) at 10 random moments of a rebuild: the target is always
    the old engine, whole, or the new one, whole; never a mix, never half-written."""
    target = tmp_path / "engine"
    shutil.copytree(engine, target)
    old, output = snapshot(target), greedy(target)
    started = time.monotonic()
    full = start_build(model, tmp_path / "reference")
    assert full.wait(timeout=300) == 0, full.communicate()
    duration, new = time.monotonic() - started, snapshot(tmp_path / "reference")
    moments = random.Random(0).sample(range(1, 100), 10)
    for percent in sorted(moments):
        build = start_build(model, target)
        time.sleep(duration * percent / 100)
        build.kill()
        build.communicate()
        now = snapshot(target)
        assert now == old or sorted(now) == sorted(new), f"killed at {percent}%: {sorted(now)}"
        assert greedy(target) == output  # loads: every file matches the manifest's hashes
        old = now
    assert start_build(model, target).wait(timeout=300) == 0
    assert leftovers(tmp_path) == []  # a later build sweeps the killed builds' staging


def test_ctrl_c_while_benchmarking_exits_130_with_one_line(engine):
    """Any command, not only build: SIGINT once the engine is loading or running."""
    bench = subprocess.Popen([LEAPC, "bench", str(engine), "--repeats", "100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with killed_at_exit(bench):
        maps, deadline = Path(f"/proc/{bench.pid}/maps"), time.monotonic() + 120
        if not maps.parent.is_dir():
            pytest.skip("needs Linux /proc to see when the engine is being loaded")
        while "onnxruntime" not in maps.read_text():  # ORT is imported when the engine loads
            assert bench.poll() is None and time.monotonic() < deadline, bench.communicate()
            time.sleep(0.05)
        stderr = interrupt(bench)
    assert bench.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr, stderr


def test_without_renameat2_the_old_engine_is_renamed_aside_then_removed(tmp_path, monkeypatch):
    """Kernels or filesystems without RENAME_EXCHANGE: the same result, in three renames."""
    import leapc.engine_output as engine_output

    monkeypatch.setattr(engine_output, "_exchange", lambda a, b: False)
    target = tmp_path / "engine"
    for content in ("old", "new"):
        with staged_output(target, force=True) as staging:
            (staging / "manifest.json").write_text('{"schema_version": 1, "programs": {}}')
            (staging / "tokenizer.json").write_text(content)
    assert (target / "tokenizer.json").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_an_engine_with_program_data_files_is_replaced_with_force(tmp_path):
    """An int8 program's compiled kernels (``data_files``) are the engine's own: ``--force``
    replaces the engine, and a user's file beside them is still refused."""
    target = tmp_path / "engine"
    target.mkdir()
    manifest = {"schema_version": 2, "tokenizer": {"file": "tokenizer.json"},
                "programs": {"full": {"file": "full.onnx",
                                      "data_files": {"full.ops.so": "0" * 64}}}}
    (target / "manifest.json").write_text(json.dumps(manifest))
    for name in ("tokenizer.json", "full.onnx", "full.ops.so"):
        (target / name).write_bytes(b"engine")
    assert check_output(target, True, ()) == target
    (target / "notes.md").write_text("mine")
    with pytest.raises(InputError, match="notes.md"):
        check_output(target, True, ())
