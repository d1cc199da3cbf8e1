"""`build --tune` and ``--policy auto``: the engine's policies measured on this machine, the
fastest one identical to ``ar`` recorded in the manifest and run by ``auto``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_cli import cli, user_error

import leapc
from leapc.compiler import planned_steps
from leapc.ir.errors import EngineError
from leapc.runtime.manifest import MANIFEST_FILE
from leapc.runtime.policies import DraftOptions, Policy
from leapc.stage import BuildOptions
from leapc.tune import SHORTER_CHAINS, TUNE_MAX_NEW, tune

# id prompts of the tiny model: repeats that prompt lookup and recycling can draft from
PROMPTS = ("1 2 3 4 5 1 2 3 4 5 1 2", "7 8 9 10 7 8 9 10 7")


@pytest.fixture(scope="module")
def tuned(engine_dir, tmp_path_factory) -> Path:
    engine = tmp_path_factory.mktemp("tuned") / "engine"
    shutil.copytree(engine_dir("tiny-llama"), engine)
    tune(engine, PROMPTS)
    return engine


def test_tuning_measures_every_offered_policy_and_records_the_fastest_lossless(tuned):
    manifest = leapc.load(tuned).manifest
    tuning = manifest.tuning
    measured = [(run.policy, run.max_draft) for run in tuning.table]
    assert measured[0] == (Policy.AR, None)
    assert {p for p, _ in measured} == set(manifest.policies)
    assert [(p, n) for p, n in measured if n] == \
        [(p, n) for p, lengths in SHORTER_CHAINS.items() if p in manifest.policies
         for n in lengths]
    lossless = [run for run in tuning.table if run.identical_to_ar]
    assert tuning.chosen.identical_to_ar
    assert tuning.chosen.tokens_per_s == max(run.tokens_per_s for run in lossless)
    assert (tuning.prompts, tuning.max_new_tokens) == (len(PROMPTS), TUNE_MAX_NEW)


def test_auto_runs_the_tuned_choice_with_its_draft_length(tuned):
    engine = leapc.load(tuned, policies=["auto"])
    chosen = engine.manifest.tuning.chosen
    auto = engine.generate(PROMPTS[0], 24, policy="auto")
    assert auto.stats.policy == chosen.policy.value
    assert engine.tuned_options(DraftOptions()).max_draft == chosen.max_draft
    assert auto.token_ids == engine.generate(PROMPTS[0], 24, policy="ar").token_ids


def test_auto_on_an_untuned_engine_is_ar(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    assert engine.manifest.tuning is None
    assert engine.generate(PROMPTS[1], 8, policy="auto").stats.policy == "ar"


def test_a_tuning_that_chooses_a_lossy_run_is_a_corrupt_engine(tuned, tmp_path):
    broken = tmp_path / "engine"
    shutil.copytree(tuned, broken)
    data = json.loads((broken / MANIFEST_FILE).read_text())
    lossy = {**data["tuning"]["table"][0], "identical_to_ar": False}
    data["tuning"]["table"][0] = lossy
    data["tuning"]["choice"] = 0
    (broken / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(EngineError, match="tuning choice 0 is not a run identical to ar"):
        leapc.load(broken)


def test_inspect_shows_the_tuning_table_with_the_choice_marked(tuned):
    result = cli("inspect", tuned)
    assert result.returncode == 0, result.stderr
    chosen = leapc.load(tuned).manifest.tuning.chosen
    assert "tuning · auto runs" in result.stdout
    marked = [line for line in result.stdout.splitlines() if "←" in line]
    assert len(marked) == 1 and chosen.policy.value in marked[0]


def test_bench_runs_auto_beside_ar_by_default(tuned):
    chosen = leapc.load(tuned).manifest.tuning.chosen.policy.value
    data = Path(tuned.parent / "prompts.jsonl")
    data.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    out = tuned.parent / "bench.json"
    result = cli("bench", tuned, "--prompts", data, "--max-new-tokens", "8", "--repeats", "1",
                 "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["policy"], r["ran"]) for r in rows] == [("ar", "ar"), ("auto", chosen)]
    assert rows[1]["identical_to_ar"]


def test_tuning_is_one_more_build_step():
    assert planned_steps(BuildOptions(tune_prompts=PROMPTS)) == planned_steps(BuildOptions()) + 1


def test_tune_prompts_without_tune_is_a_user_error(tmp_path):
    result = cli("build", "bundled", "-o", tmp_path / "e", "--tune-prompts", tmp_path / "p.jsonl")
    user_error(result, "--tune-prompts needs --tune")
