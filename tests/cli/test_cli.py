"""The ``leapc`` command line, run as a subprocess exactly as users run it.

Happy paths print what they promise; every user mistake exits with code 2 and exactly one
``error: ...`` line on stderr, never a traceback. Build mistakes are checked in this
process (``in_process``): a ``leapc build`` process imports torch before it can refuse
anything (~5 s a case); test_bad_input.py and test_build_output.py run builds as processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from engines import STORIES_REFERENCE, id_tokenizer
from families import UNSUPPORTED

import leapc
from leapc.inspection import byte_size

LEAPC = shutil.which("leapc", path=str(Path(sys.executable).parent)) or shutil.which("leapc")


def cli(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    assert LEAPC, "the leapc console script is not installed beside this python"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEAPC_THREADS": "1", "COLUMNS": "250",
           "NO_COLOR": "1"}
    return subprocess.run([LEAPC, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, one ``error:`` line on stderr (naming ``fragments``), no traceback."""
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    assert result.returncode == 2, (result.returncode, everything)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny(engine_dir) -> Path:
    return engine_dir("tiny-llama", "ort")


@pytest.fixture(scope="module")
def stories(engine_dir) -> Path:
    return engine_dir("stories", "ort")


@pytest.fixture
def broken(tiny, tmp_path) -> Path:
    """A private copy of the tiny engine, free to break."""
    copy = tmp_path / "engine"
    shutil.copytree(tiny, copy)
    return copy


# ------------------------------------------------------------------ run


@pytest.mark.slow
def test_run_json_on_stories_reproduces_reference(stories):
    result = cli("run", stories, "--prompt", "", "--max-new-tokens", "60", "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # one JSON object, nothing else on stdout
    data = json.loads(lines[0])
    assert data["text"] == STORIES_REFERENCE
    assert len(data["token_ids"]) == 60
    assert data["token_ids"] == leapc.load(stories).generate("", 60).token_ids
    assert data["policy"] == "ar"
    assert data["steps"] == 60  # AR: one target forward per new token (prefill's included)
    assert data["tau"] == pytest.approx(1.0)
    assert data["tokens_per_s"] > 0
    assert data["new_tokens"] == 60
    assert data["prompt_tokens"] == 1  # BOS only
    assert data["stop_reason"] == "max_new_tokens"


def test_run_prompt_ids_on_tiny(tiny):
    result = cli("run", tiny, "--prompt-ids", "1,2,3", "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    expected = leapc.load(tiny).generate([1, 2, 3], 12)
    assert data["token_ids"] == expected.token_ids
    assert data["text"] == expected.text
    assert data["prompt_tokens"] == 3
    assert data["new_tokens"] == 12


def test_run_streams_text_and_reports_stats_on_stderr(tiny):
    result = cli("run", tiny, "--prompt-ids", "5, 17, 200", "--max-new-tokens", "7")
    assert result.returncode == 0, result.stderr
    expected = leapc.load(tiny).generate([5, 17, 200], 7)
    assert result.stdout == expected.text + "\n"
    assert "7 tokens" in result.stderr and "tok/s" in result.stderr
    assert "stopped at --max-new-tokens 7" in result.stderr
    assert "max-seq" not in result.stderr


def test_run_says_when_max_seq_cut_generation_short(tiny):
    """250 prompt ids on a max-seq 256 engine: 6 of the 20 tokens asked for fit."""
    ids = ",".join(str((7 * i) % 256) for i in range(250))
    result = cli("run", tiny, "--prompt-ids", ids, "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    new = len(leapc.load(tiny).generate([(7 * i) % 256 for i in range(250)], 20).token_ids)
    assert f"stopped at max-seq 256 (the engine's context) after {new} of 20 tokens" in \
        result.stderr
    data = json.loads(cli("run", tiny, "--prompt-ids", ids, "--max-new-tokens", "20",
                          "--json").stdout)
    assert data["stop_reason"] == "max_seq" and data["new_tokens"] == new < 20


@pytest.mark.parametrize("reason, says", [
    ("eos", "5 tokens, 100.0 tok/s, tau 1.00; stopped at an end-of-sequence token"),
    ("max_new_tokens", "5 tokens, 100.0 tok/s, tau 1.00; stopped at --max-new-tokens 9"),
    ("max_seq", "5 tokens, 100.0 tok/s, tau 1.00; stopped at max-seq 64 (the engine's "
                "context) after 5 of 9 tokens"),
])
def test_run_stats_line_says_why_generation_stopped(capsys, reason, says):
    """(The engines here never emit EOS: the line is checked on stats made up for it.)"""
    from leapc.cli import _print_stats
    from leapc.runtime.decode import GenerationStats, StopReason

    stats = GenerationStats("ar", new_tokens=5, steps=5, decode_s=0.05,
                            stop_reason=StopReason(reason))
    _print_stats(stats, max_new_tokens=9, max_seq=64)
    assert capsys.readouterr().err == says + "\n"


def test_run_sampling_is_seeded(tiny):
    args = ("run", tiny, "--prompt-ids", "9", "--max-new-tokens", "16", "--json",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95")
    first = json.loads(cli(*args, "--seed", "3").stdout)["token_ids"]
    assert json.loads(cli(*args, "--seed", "3").stdout)["token_ids"] == first
    expected = leapc.load(tiny).generate([9], 16, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    assert first == expected.token_ids


# ------------------------------------------------------------------ inspect


def test_inspect_engine(tiny):
    result = cli("inspect", tiny)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "T + N" in text
    assert "KV bytes" in text
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["passes"], "the engine records no passes"
    for name in manifest["passes"]:
        assert name in text, name
    assert "ort" in text
    assert "anatomy" in text
    assert re.search(r"quantization\s+│ none", text)
    assert re.search(r"datastore\s+│ none", text)
    # the files table: the program's own bytes, and what it reads of the one weights copy
    weights = json.loads((tiny / "weights.json").read_text())["programs"]["full.onnx"]
    shared = byte_size(sum(t["nbytes"] for t in weights.values()))
    own = byte_size((tiny / "full.onnx").stat().st_size)
    assert re.search(rf"full\s+│ full\.onnx\s+│ {own}\s+│ {shared}\s+│ 0 B", text), text
    on_disk = byte_size(sum(f.stat().st_size for f in tiny.rglob("*") if f.is_file()))
    assert re.search(rf"engine\s+│ the whole directory\s+│ {on_disk}", text)


@pytest.mark.slow
def test_inspect_shows_the_datastore(stories):
    text = cli("inspect", stories).stdout
    assert "retrieval" in text
    assert re.search(r"datastore\s+│ [\d,]+ tokens in 1 documents .*stories\.txt", text)


def test_inspect_corrupt_engine_is_a_user_error(broken):
    (broken / "manifest.json").write_text("{{{")
    user_error(cli("inspect", broken), "not valid JSON")


# ------------------------------------------------------------------ bench


def test_bench_writes_json(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    # the tiny tokenizer is WordLevel with no pre-tokenizer: one id per prompt string
    prompts.write_text("".join(json.dumps(p) + "\n" for p in ("5", "17", "200")))
    engine = leapc.load(tiny)
    assert [engine.encode(p) for p in ("5", "17", "200")] == [[5], [17], [200]]
    out = tmp_path / "bench.json"
    result = cli("bench", tiny, "--max-new-tokens", "8", "--repeats", "1", "--json", out,
                 "--prompts", prompts)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {"model", "backend", "prompts", "max_new_tokens", "results", "baselines"} <= set(data)
    assert data["backend"] == "ort"
    assert data["prompts"] == 3
    assert data["max_new_tokens"] == 8
    assert data["baselines"] == {}
    # by default ``ar`` and ``auto``, which on an engine built without --tune runs ``ar``
    assert [(r["policy"], r["ran"]) for r in data["results"]] == [("ar", "ar"), ("auto", "ar")]
    row = data["results"][0]
    assert {"policy", "tokens_per_s", "tau", "steps", "speedup_vs_ar", "identical_to_ar"} <= set(row)
    assert row["policy"] == "ar"
    assert row["tokens_per_s"] > 0
    assert row["tau"] == pytest.approx(1.0)
    assert row["steps"] == 3 * 8
    assert row["speedup_vs_ar"] == pytest.approx(1.0)
    assert row["identical_to_ar"] is True
    assert "tokens/s" in result.stdout  # the table


def test_bench_missing_prompt_file(tiny, tmp_path):
    user_error(cli("bench", tiny, "--prompts", tmp_path / "none.jsonl", "--repeats", "1"),
               "does not exist")


def test_bench_prompt_file_with_bad_line(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"5"\nnot json\n')
    user_error(cli("bench", tiny, "--prompts", prompts, "--repeats", "1"), "not a JSON line")


def test_bench_unknown_policy(tiny):
    user_error(cli("bench", tiny, "--policies", "ar,warp", "--repeats", "1"),
               "unknown policy", "warp")


# ------------------------------------------------------------------ lookahead


def test_run_lookahead_uses_the_window_setting(tiny):
    from leapc.runtime.drafters.lookahead import LookaheadConfig
    from leapc.runtime.policies import DraftOptions

    result = cli("run", tiny, "--prompt-ids", "1,2,3", "--max-new-tokens", "24", "--json",
                 "--policy", "lookahead", "--lookahead", "5,4,5")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    engine = leapc.load(tiny)
    chosen = engine.generate([1, 2, 3], 24, policy="lookahead",
                             draft=DraftOptions(lookahead=LookaheadConfig(5, 4, 5)))
    default = engine.generate([1, 2, 3], 24, policy="lookahead")
    assert data["policy"] == "lookahead"
    assert data["token_ids"] == chosen.token_ids == engine.generate([1, 2, 3], 24).token_ids
    assert data["steps"] == chosen.stats.steps != default.stats.steps  # 5,4,5 reached it


def test_bench_lookahead_row(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"5"\n"17"\n')
    out = tmp_path / "bench.json"
    result = cli("bench", tiny, "--policies", "ar,lookahead", "--lookahead", "3,3,2",
                 "--max-new-tokens", "16", "--repeats", "1", "--prompts", prompts, "--json", out)
    assert result.returncode == 0, result.stderr
    rows = {row["policy"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["lookahead"]["identical_to_ar"] is True
    assert rows["lookahead"]["steps"] <= rows["ar"]["steps"] == 2 * 16


@pytest.mark.parametrize("value, fragments", [
    ("5,4", ("--lookahead", "W,N,G", "'5,4'")),
    ("5,x,5", ("--lookahead", "'5,x,5'")),
    ("5,2,5", ("5,2,5", "N >= 3")),
    ("40,10,5", ("40,10,5", "369 tokens", "at most 128")),
])
def test_bad_lookahead_setting(tiny, value, fragments):
    user_error(cli("run", tiny, "--prompt-ids", "1", "--policy", "lookahead", "--lookahead", value),
               *fragments)


# ------------------------------------------------------------------ user errors


def test_missing_engine_directory(tmp_path):
    user_error(cli("run", tmp_path / "nowhere", "--prompt", "hi"), "does not exist")


def test_directory_that_is_not_an_engine(tmp_path):
    user_error(cli("run", tmp_path, "--prompt", "hi"), "not a leapc engine")


def test_corrupt_engine_manifest_garbage(broken):
    (broken / "manifest.json").write_bytes(b"\x00garbage{")
    user_error(cli("run", broken, "--prompt-ids", "1"), "not valid JSON")


def test_unknown_manifest_schema_version(broken):
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    user_error(cli("run", broken, "--prompt-ids", "1"), "schema version 99")


def test_corrupt_program_file(broken):
    manifest = json.loads((broken / "manifest.json").read_text())
    program = broken / manifest["programs"]["full"]["file"]
    data = bytearray(program.read_bytes())
    data[len(data) // 3] ^= 0x5A
    program.write_bytes(bytes(data))
    user_error(cli("run", broken, "--prompt-ids", "1"), "corrupt")


@pytest.mark.slow  # a `leapc build` process: ~5 s of imports before it refuses
def test_build_unsupported_model(tmp_path):
    from families import tiny_checkpoint

    model = tiny_checkpoint("bloom", tmp_path / "bloom")
    id_tokenizer(256).save(str(model / "tokenizer.json"))  # so the failure is the model
    out = tmp_path / "engine"
    line = user_error(cli("build", model, "-o", out), "bloom", "ALiBi")
    assert "tokenizer" not in line
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("family", sorted(set(UNSUPPORTED) - {"bloom"}))
def test_build_refuses_unsupported_features(in_process, tmp_path, family):
    """Every refused test family is one line naming its feature, exit 2 (bloom: above)."""
    from families import tiny_checkpoint

    model = tiny_checkpoint(family, tmp_path / family)
    id_tokenizer(256).save(str(model / "tokenizer.json"))
    out = tmp_path / "engine"
    user_error(in_process("build", model, "-o", out, "--max-seq", "64"), UNSUPPORTED[family])
    assert not (out / "manifest.json").exists()


def test_build_missing_model(in_process, tmp_path):
    user_error(in_process("build", tmp_path / "nowhere", "-o", tmp_path / "out"), "does not exist")


def test_build_unknown_attention_lowering(in_process, tmp_path):
    user_error(in_process("build", "bundled", "-o", tmp_path / "out", "--attention", "sparse"),
               "unknown attention lowering 'sparse'", "dense, tree")


def test_build_missing_datastore_source_fails_before_compiling(in_process, tmp_path):
    user_error(in_process("build", "bundled", "-o", tmp_path / "out", "--datastore",
                          tmp_path / "none"), "datastore source", "does not exist")
    user_error(in_process("build", "bundled", "-o", tmp_path / "out", "--datastore", "bundled",
                          "--datastore", tmp_path), "cannot be combined")


def test_retrieval_needs_an_engine_built_with_a_datastore(tiny):
    user_error(cli("run", tiny, "--prompt-ids", "1", "--policy", "retrieval"),
               "does not support policy 'retrieval'")


@pytest.mark.slow
def test_run_retrieval_matches_ar_on_stories(stories):
    args = ("run", stories, "--prompt", "Once upon a time", "--max-new-tokens", "48", "--json")
    ar = json.loads(cli(*args).stdout)
    result = cli(*args, "--policy", "retrieval", "--retrieval-nodes", "3")
    assert result.returncode == 0, result.stderr
    retrieval = json.loads(result.stdout)
    assert retrieval["token_ids"] == ar["token_ids"]
    assert retrieval["steps"] < ar["steps"]  # its datastore holds this very story


def test_prompt_longer_than_max_seq(tiny):
    ids = ",".join(str(i % 256) for i in range(300))
    user_error(cli("run", tiny, "--prompt-ids", ids), "300 tokens", "max-seq", "256")


def test_prompt_of_exactly_max_seq_is_refused(tiny):
    ids = ",".join(str(i % 256) for i in range(256))
    user_error(cli("run", tiny, "--prompt-ids", ids), "256 tokens", "max-seq")


def test_prompt_one_short_of_max_seq_runs_to_the_end(tiny):
    """255 prompt ids on a max-seq 256 engine: prefill in chunks, then stop at max-seq."""
    ids = [(7 * i) % 256 for i in range(255)]
    result = cli("run", tiny, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "10",
                 "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert 1 <= data["new_tokens"] <= 2
    assert data["token_ids"] == leapc.load(tiny).generate(ids, 10).token_ids


def test_prompt_id_outside_vocabulary(tiny):
    user_error(cli("run", tiny, "--prompt-ids", "1,999"), "999", "vocabulary")


def test_prompt_ids_not_integers(tiny):
    user_error(cli("run", tiny, "--prompt-ids", "1,two,3"), "--prompt-ids")


def test_unknown_policy(tiny):
    user_error(cli("run", tiny, "--prompt-ids", "1", "--policy", "warp-drive"),
               "unknown policy", "warp-drive")


def test_bad_flag_value(tiny):
    user_error(cli("run", tiny, "--prompt-ids", "1", "--max-new-tokens", "abc"),
               "--max-new-tokens")


def test_unknown_flag(tiny):
    user_error(cli("run", tiny, "--prompt-ids", "1", "--frobnicate"), "--frobnicate")


def test_both_prompt_and_prompt_ids(tiny):
    user_error(cli("run", tiny, "--prompt", "5", "--prompt-ids", "1"), "exactly one")


def test_neither_prompt_nor_prompt_ids(tiny):
    user_error(cli("run", tiny), "exactly one")


def test_negative_temperature(tiny):
    user_error(cli("run", tiny, "--prompt-ids", "1", "--temperature", "-0.5"), "temperature")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--max-new-tokens", "0", "max-new-tokens"),
    ("--top-p", "1.5", "top-p"),
    ("--top-p", "0", "top-p"),
    ("--top-k", "-1", "top-k"),
])
def test_out_of_range_options(tiny, flag, value, fragment):
    user_error(cli("run", tiny, "--prompt-ids", "1", flag, value), fragment)


def test_missing_command_and_argument():
    user_error(cli())
    user_error(cli("run"), "engine")
    user_error(cli("frobnicate"))


# ------------------------------------------------------------------ decoding heads


def test_inspect_shows_the_heads_and_their_tree(heads_engine_dir):
    text = cli("inspect", heads_engine_dir("tiny-llama", "medusa")).stdout
    assert "decoding heads · 3 × medusa" in text
    assert re.search(r"static tree: \d+ nodes, chosen by default", text)
    assert "step signature · heads" in text and "head_logits" in text


def test_run_a_head_policy(heads_engine_dir):
    engine = heads_engine_dir("tiny-llama", "hydra")
    plain = cli("run", engine, "--prompt-ids", "5,6,7", "--max-new-tokens", "20", "--json")
    drafted = cli("run", engine, "--prompt-ids", "5,6,7", "--max-new-tokens", "20", "--json",
                  "--policy", "hydra-dynamic", "--tree-nodes", "8", "--beam", "2")
    assert drafted.returncode == 0, drafted.stderr
    assert json.loads(drafted.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]


def test_head_build_mistakes_are_user_errors(in_process, tmp_path):
    user_error(in_process("build", "bundled", "-o", tmp_path / "e", "--tree", "auto"),
               "--train-heads and --tree need --heads K")
    user_error(in_process("build", "bundled", "-o", tmp_path / "e", "--heads", "3"),
               "ships 4 medusa heads", "--train-heads TEXT")
    user_error(in_process("build", "bundled", "-o", tmp_path / "e", "--heads", "4",
                          "--head-kind", "hydra", "--head-placement", "step"), "Hydra heads")
    tree = tmp_path / "tree.json"
    tree.write_text("[[0], [0, 0, 0, 0, 0]]")
    user_error(in_process("build", "bundled", "-o", tmp_path / "e", "--heads", "4", "--tree",
                          tree), "needs more than the 4 heads")


@pytest.mark.parametrize("exit_layer", ["0", "12"])
def test_build_refuses_an_exit_layer_out_of_range(in_process, tmp_path, exit_layer):
    result = in_process("build", "bundled", "-o", tmp_path / "e", "--exit-layer", exit_layer)
    user_error(result, "exit layer", "1 to 11")


def test_build_refuses_an_exit_layer_that_is_not_a_number(in_process, tmp_path):
    result = in_process("build", "bundled", "-o", tmp_path / "e", "--exit-layer", "middle")
    user_error(result, "--exit-layer must be a layer number or 'auto'", "'middle'")


def test_build_refuses_an_adapter_without_an_exit(in_process, tmp_path):
    result = in_process("build", "bundled", "-o", tmp_path / "e", "--train-adapter", tmp_path / "a")
    user_error(result, "--train-adapter needs --exit-layer")


def test_build_refuses_a_draft_vocabulary_without_drafts_or_of_a_bad_size(in_process, tmp_path):
    user_error(in_process("build", "bundled", "-o", tmp_path / "e", "--draft-vocab", "512"),
               "--draft-vocab restricts draft programs: it needs --exit-layer, --skip or --heads")
    user_error(in_process("build", "bundled", "-o", tmp_path / "e", "--exit-layer", "4",
                          "--draft-vocab", "8192"), "--draft-vocab must be between 1 and")
    user_error(in_process("build", "bundled", "-o", tmp_path / "e", "--draft-vocab-text",
                          tmp_path), "--draft-vocab-text needs --draft-vocab K")
    assert not (tmp_path / "e").exists()


def test_run_refuses_kangaroo_on_an_engine_without_an_adapter(tiny):
    result = cli("run", tiny, "--prompt-ids", "1", "--policy", "kangaroo")
    user_error(result, "engine does not support policy 'kangaroo'")


def test_build_refuses_a_bad_skip_set(in_process, tmp_path):
    result = in_process("build", "bundled", "-o", tmp_path / "e", "--skip", "a3,x4")
    user_error(result, "'x4' is not a layer (7), an attention (a7) or an MLP (m7) sublayer")


# Every drafting flag, set away from its default, and the DraftOptions it must become.
DRAFTING = ("--max-draft", "5", "--ngram", "3", "--matches", "2", "--adaptive",
            "--draft-tree", "2,1", "--confidence", "0.25", "--tree-sampling", "iid",
            "--lookahead", "4,3,2", "--retrieval-nodes", "7", "--tree-nodes", "9", "--beam", "3")


def test_run_and_bench_turn_the_drafting_flags_into_one_draft_options(in_process, monkeypatch,
                                                                       tmp_path):
    from leapc import benchmark
    from leapc.runtime.drafters.base import ChildSampling
    from leapc.runtime.drafters.heads import DynamicTree
    from leapc.runtime.drafters.lookahead import LookaheadConfig
    from leapc.runtime.drafters.retrieval import RetrievalConfig
    from leapc.runtime.policies import DraftOptions

    expected = DraftOptions(max_draft=5, ngram=3, matches=2, adaptive=True, branching=(2, 1),
                            confidence=0.25, children=ChildSampling.IID,
                            lookahead=LookaheadConfig(4, 3, 2),
                            retrieval=RetrievalConfig(nodes=7), dynamic=DynamicTree(9, 3))
    received = []

    class Stop(Exception):
        pass

    def stream(*args, draft, **kwargs):
        received.append(draft)
        raise Stop

    def bench(engine, cfg, vs_hf, vs_llamacpp=False):
        received.append(cfg.draft)
        raise Stop

    autoregressive = SimpleNamespace(model=SimpleNamespace(diffusion=None))
    monkeypatch.setattr(leapc, "load", lambda *a, **k: type(
        "E", (), {"stream": stream, "manifest": autoregressive})())
    monkeypatch.setattr(benchmark, "run_bench", bench)
    for command in (("run", tmp_path, "--prompt-ids", "1"), ("bench", tmp_path)):
        with pytest.raises(Stop):
            in_process(*command, *DRAFTING)
    assert received == [expected, expected]


@pytest.mark.slow  # the bundled engine
def test_run_heals_a_text_prompt_unless_told_not_to(engine_dir):
    engine_path = engine_dir("bundled")
    args = ("run", engine_path, "--prompt", "def add(a, b):\n", "--max-new-tokens", "12",
            "--json")
    healed = json.loads(cli(*args).stdout)
    plain = json.loads(cli(*args, "--no-token-healing").stdout)
    engine = leapc.load(engine_path)
    assert healed["token_ids"] == engine.generate("def add(a, b):\n", 12,
                                                  token_healing=True).token_ids
    assert plain["token_ids"] == engine.generate("def add(a, b):\n", 12).token_ids
    assert plain["text"].startswith("\n") and not healed["text"].startswith("\n")
    assert healed["prompt_tokens"] < plain["prompt_tokens"]
