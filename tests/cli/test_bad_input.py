"""Every user mistake is one ``error:`` line on stderr and exit code 2, never a traceback.

Most cases run the CLI in-process (``leapc.cli.main``); those that depend on what a
process reads once (``LEAPC_THREADS`` sizes ORT's one thread pool) or on how the OS hands
over arguments (a prompt that is not UTF-8) run it as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engines import tiny_source

LEAPC = shutil.which("leapc", path=str(Path(sys.executable).parent)) or shutil.which("leapc")


def one_error_line(code: int, stdout: str, stderr: str, *fragments: str) -> str:
    """Exit code 2, one ``error:`` line on stderr naming ``fragments``, no traceback."""
    assert "Traceback" not in stdout + stderr, stdout + stderr
    assert code == 2, (code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def leapc_main(in_process):
    """``leapc_main(*args, fragments=())`` runs the CLI in this process and checks that it
    failed with one error line naming ``fragments``; returns that line."""

    def run(*args: str | Path, fragments: tuple[str, ...] = ()) -> str:
        result = in_process(*args)
        return one_error_line(result.returncode, result.stdout, result.stderr, *fragments)

    return run


def subprocess_cli(*args: str | Path | bytes, **env: str) -> subprocess.CompletedProcess:
    assert LEAPC, "the leapc console script is not installed beside this python"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "LEAPC_THREADS": "1",
                   "COLUMNS": "250", "NO_COLOR": "1", **env}
    return subprocess.run([LEAPC, *(a if isinstance(a, bytes) else str(a) for a in args)],
                          capture_output=True, timeout=240, env=environment)


def subprocess_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    return one_error_line(result.returncode, result.stdout.decode(errors="replace"),
                          result.stderr.decode(errors="replace"), *fragments)


@pytest.fixture(scope="module")
def tiny(engine_dir) -> Path:
    return engine_dir("tiny-llama", "ort")


# ------------------------------------------------------------------ run: sampling options


@pytest.mark.parametrize("flag, value, fragments", [
    ("--seed", "-1", ("seed", "-1")),
    ("--temperature", "nan", ("temperature", "nan")),
    ("--temperature", "inf", ("temperature", "inf")),
    ("--temperature", "-inf", ("temperature",)),
    ("--temperature", "1e-310", ("temperature", "1e-310", ">= 1.9e-270")),
    ("--top-p", "nan", ("top-p", "nan")),
    ("--max-new-tokens", "0", ("max-new-tokens",)),
    ("--max-new-tokens", "-3", ("max-new-tokens", "-3")),
])
def test_run_refuses_an_out_of_range_option(leapc_main, tiny, flag, value, fragments):
    leapc_main("run", tiny, "--prompt-ids", "1", flag, value, fragments=fragments)


def test_the_smallest_temperature_allowed_samples_without_nans(tiny):
    """The bound is the real one: at it, the softmax is finite (here: greedy-like)."""
    import leapc
    from leapc.runtime.engine import MIN_TEMPERATURE

    engine = leapc.load(tiny)
    greedy = engine.generate([1], 8).token_ids
    assert engine.generate([1], 8, temperature=MIN_TEMPERATURE).token_ids == greedy


# ------------------------------------------------------------------ run: prompts


@pytest.mark.parametrize("ids, fragments", [
    (",,,", ("--prompt-ids", "comma-separated integers", "',,,'")),
    ("", ("--prompt-ids", "no token id")),
    ("1,,2", ("--prompt-ids", "comma-separated integers")),
    ("1,2,", ("--prompt-ids", "comma-separated integers")),
    ("-1", ("-1", "vocabulary")),
    ("3,-7", ("-7", "vocabulary")),
    ("99999999999999999999999", ("99999999999999999999999", "vocabulary")),
])
def test_run_refuses_bad_prompt_ids(leapc_main, tiny, ids, fragments):
    leapc_main("run", tiny, "--prompt-ids", ids, fragments=fragments)


def test_run_refuses_a_prompt_that_is_not_utf8(leapc_main, tiny):
    # what Python makes of the argument bytes b"\xff" (surrogateescape)
    leapc_main("run", tiny, "--prompt", "ab\udcff", fragments=("--prompt", "UTF-8"))


def test_run_refuses_a_prompt_that_is_not_utf8_from_the_shell(tiny):
    result = subprocess_cli("run", tiny, "--prompt", b"x\xff", "--max-new-tokens", "2")
    subprocess_error(result, "--prompt", "not valid UTF-8")


# ------------------------------------------------------------------ environment


@pytest.mark.parametrize("threads", ["abc", "-2", "1.5"])
def test_bad_leapc_threads(tiny, threads):
    result = subprocess_cli("run", tiny, "--prompt-ids", "1", LEAPC_THREADS=threads)
    subprocess_error(result, "LEAPC_THREADS", repr(threads))


def test_leapc_threads_zero_or_empty_means_all_cores(tiny):
    for threads in ("0", ""):
        result = subprocess_cli("run", tiny, "--prompt-ids", "1", "--max-new-tokens", "2",
                                LEAPC_THREADS=threads)
        assert result.returncode == 0, result.stderr.decode()


def test_leapc_cache_that_cannot_be_created(leapc_main, tmp_path, monkeypatch):
    """As root no permission stops a write, so the cache lies under a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LEAPC_CACHE", str(blocker / "cache"))
    leapc_main("demo", fragments=("engine cache", str(blocker / "cache"), "LEAPC_CACHE"))


# ------------------------------------------------------------------ bench


def test_bench_refuses_empty_policies(leapc_main, tiny):
    leapc_main("bench", tiny, "--policies", "", fragments=("--policies", "no policy"))
    leapc_main("bench", tiny, "--policies", " , ", fragments=("--policies", "no policy"))


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "0"), ("--max-new-tokens", "-1"),
                                         ("--repeats", "0")])
def test_bench_refuses_out_of_range_counts(leapc_main, tiny, flag, value):
    leapc_main("bench", tiny, flag, value, fragments=(flag,))


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_output_into_a_missing_directory_fails_before_benchmarking(leapc_main, tmp_path,
                                                                         option):
    """Checked first: the engine given does not even exist, yet the output is the error."""
    target = tmp_path / "missing" / "out.file"
    leapc_main("bench", tmp_path / "no-engine", option, target,
               fragments=(option, str(tmp_path / "missing"), "does not exist"))


def test_bench_output_that_is_a_directory(leapc_main, tiny, tmp_path):
    leapc_main("bench", tiny, "--json", tmp_path, fragments=("--json", "is a directory"))


@pytest.mark.parametrize("content, fragments", [
    ('"5"\n{"text": "17"}\n', (":2:", '"prompt" string')),
    ('{"prompt": 5}\n', (":1:", '"prompt" string')),
    ("[1, 2]\n", (":1:", '"prompt" string')),
    ('"5"\n{"prompt": "17"\n', (":2:", "not a JSON line")),
    ('"\\udcff"\n', ("prompts.jsonl:1 ", "UTF-8")),
    ("\n  \n", ("no prompts",)),
])
def test_bench_refuses_a_bad_prompt_file(leapc_main, tiny, tmp_path, content, fragments):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    leapc_main("bench", tiny, "--prompts", prompts, "--repeats", "1", fragments=fragments)


def test_bench_refuses_a_prompt_file_that_is_not_utf8(leapc_main, tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'"5"\n"\xff\xfe"\n')
    leapc_main("bench", tiny, "--prompts", prompts, fragments=("not UTF-8",))


def test_bench_prompt_file_keeps_line_separators_inside_strings(tmp_path):
    from leapc.benchmark import load_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n\"c\"\n")
    assert load_prompts(prompts) == ("a\u2028b", "c")


def test_bench_checks_every_prompt_before_benchmarking(leapc_main, tiny, tmp_path,
                                                      monkeypatch):
    """A prompt the engine refuses (here: one made to be too long) fails the bench first."""
    import leapc.benchmark
    from leapc.ir.errors import InputError
    from leapc.runtime.engine import Engine

    def timed(*_):
        raise AssertionError("benchmarked before checking the prompts")

    encode = Engine.encode

    def refusing(self, prompt):
        if prompt == "too long":
            raise InputError("prompt has 300 tokens; this engine's max-seq is 256")
        return encode(self, prompt)

    monkeypatch.setattr(leapc.benchmark, "_timed_runs", timed)
    monkeypatch.setattr(Engine, "encode", refusing)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"5"\n"too long"\n')
    leapc_main("bench", tiny, "--prompts", prompts, fragments=("300 tokens", "max-seq"))


# ------------------------------------------------------------------ build


def test_build_refuses_negative_heads(leapc_main, tmp_path):
    leapc_main("build", "bundled", "-o", tmp_path / "e", "--heads", "-1",
               fragments=("--heads", "-1"))
    assert not (tmp_path / "e").exists()


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """A tiny Hugging Face directory (config, safetensors weights, tokenizer.json)."""
    source = tiny_source("llama")
    directory = tmp_path / "hf"
    source.model.save_pretrained(directory)
    source.tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_build_refuses_a_batch_bound_below_one(leapc_main, hf_dir, tmp_path):
    leapc_main("build", hf_dir, "-o", tmp_path / "e", "--max-batch", "0",
               fragments=("max-batch", "got 0"))
    assert not (tmp_path / "e").exists()


def test_build_refuses_a_missing_tokenizer_file(leapc_main, hf_dir, tmp_path):
    leapc_main("build", hf_dir, "-o", tmp_path / "e", "--tokenizer", tmp_path / "none.json",
               fragments=("tokenizer", str(tmp_path / "none.json"), "does not exist"))


def test_build_refuses_a_corrupt_tokenizer_json(leapc_main, hf_dir, tmp_path):
    (hf_dir / "tokenizer.json").write_text('{"model": ')
    leapc_main("build", hf_dir, "-o", tmp_path / "e",
               fragments=("tokenizer.json", "not a valid tokenizer"))


def test_build_refuses_a_tokenizer_json_that_is_not_utf8(leapc_main, hf_dir, tmp_path):
    (hf_dir / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    leapc_main("build", hf_dir, "-o", tmp_path / "e", fragments=("not a valid tokenizer",))


@pytest.mark.parametrize("keep", [0.5, 0.0001, 0.0])
def test_build_refuses_truncated_weights(leapc_main, hf_dir, tmp_path, keep):
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    leapc_main("build", hf_dir, "-o", tmp_path / "e",
               fragments=(str(hf_dir), "corrupt or truncated"))
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------ serve


@pytest.mark.parametrize("args, fragments", [
    (("--policy", "medusa"), ("does not support policy 'medusa'",)),
    (("--policy", "nonsense"), ("policy", "nonsense")),
    (("--max-queue", "0"), ("--max-queue", "0")),
    (("--max-batch", "9"), ("max-batch must be in [1, 8]", "got 9", "--max-batch")),
    (("--max-batch", "0"), ("max-batch must be in [1, 8]", "got 0")),
    (("--ray", "--replicas", "0"), ("--replicas", "0")),
    (("--prefix-cache-mb", "-1"), ("--prefix-cache-mb", "at least 0", "got -1")),
])
def test_serve_refuses_before_listening(leapc_main, tiny, args, fragments):
    """A server that could not serve its default policy, or queue anything, never starts
    (an address no server can bind: were the refusal to come late, uvicorn's failure to
    listen would fail the test rather than hang it)."""
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'leapc[serve]')")
    leapc_main("serve", tiny, "--host", "256.0.0.1", *args, fragments=fragments)
