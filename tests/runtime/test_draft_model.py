"""Draft-model speculation: greedy identity and rule 2's exactness under sampling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from engines import tiny_source
from stats import chi2_critical, chi2_homogeneity, plain_samples

import leapc
from leapc.models.loaders import SourceModel
from leapc.runtime.decode import GenerationStats, StopConfig, decode, prefill
from leapc.runtime.drafters.base import ChildSampling
from leapc.runtime.policies import DraftOptions, new_cache
from leapc.runtime.sampling import SamplingConfig

PROMPT = [5, 17, 200, 3]
pytestmark = pytest.mark.slow  # the engine builds two models (~15 s); the sampling tests 8k runs


def noisy_copy(source: SourceModel, scale: float, seed: int = 0) -> SourceModel:
    """A draft that agrees with the target often, but not always: q close to, not equal to, p."""
    model = copy.deepcopy(source.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return SourceModel(model, source.tokenizer, "noisy-draft", source.bos_id, source.eos_ids)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Width-invariant attention, which the draft model is lowered with as the target is:
    the draft's rows are then bit-identical however they are fed (a chain's calls,
    step-by-step calls, one pass)."""
    target = tiny_source("llama")
    path = leapc.build(target, tmp_path_factory.mktemp("draft"), "ort", max_seq=256,
                       attention="invariant", draft_model=noisy_copy(target, 0.02),
                       draft_chain=True)
    return leapc.load(path)


def test_manifest_records_the_draft_program(engine):
    assert "draft_model" in engine.manifest.programs
    assert engine.manifest.draft_model.source == "noisy-draft"
    assert "draft" in [p.value for p in engine.manifest.policies]


@pytest.mark.parametrize("options", (
    DraftOptions(max_draft=4), DraftOptions(max_draft=8), DraftOptions(max_draft=6, adaptive=True),
    DraftOptions(max_draft=4, branching=(2, 2)), DraftOptions(max_draft=3, branching=(4,))))
def test_greedy_draft_is_token_identical_to_ar(engine, options):
    for prompt in (PROMPT, [9], list(range(40, 140))):
        ar = engine.generate(prompt, 64)
        drafted = engine.generate(prompt, 64, policy="draft", draft=options)
        assert drafted.token_ids == ar.token_ids
    assert drafted.stats.tau > 1.1  # the close draft is often right


def test_tree_drafts_leave_the_draft_cache_as_one_pass_over_its_tokens(engine):
    """Branching trees feed the nodes below the scratch chain again at each depth and keep
    accepted rows from the scratch and from the last call: the draft model's cache still
    holds exactly the rows one pass over the same tokens writes."""
    sampling, options = SamplingConfig(), DraftOptions(max_draft=4, branching=(2, 2))
    cache, stats = engine.new_cache("draft"), GenerationStats("draft")
    drafter = engine.drafter("draft", cache, options, sampling)
    emitted = decode(engine.step, cache, PROMPT, engine.manifest.max_new, drafter, sampling,
                     StopConfig(64, ()), np.random.default_rng(0), stats)
    tokens = PROMPT + [t for new in emitted for t in new]
    assert max(stats.accepted_depth) >= 2, "the test needs paths through the branches"
    held = drafter.cache
    one_pass = new_cache(engine.manifest.draft_model.dims, engine.manifest.max_seq)
    prefill(drafter.step, one_pass, tokens[: held.length], engine.manifest.max_new)
    assert held.length > len(PROMPT) + 32
    np.testing.assert_array_equal(held.buffer[..., : held.length, :],
                                  one_pass.buffer[..., : held.length, :])


def test_the_unrolled_chain_is_built_only_when_asked(engine):
    from leapc.compiler import planned_steps
    from leapc.stage import BuildOptions

    assert "draft_model_chain" in engine.manifest.programs  # built with draft_chain=True
    plain = planned_steps(BuildOptions(draft_model="draft"))
    assert planned_steps(BuildOptions(draft_model="draft", draft_chain=True)) == plain + 2


def test_greedy_chains_are_one_call_drafting_what_step_by_step_calls_draft(engine):
    """The unrolled chain (``draft_model_chain``) against the same engine without it (as built
    before it existed): the same drafts (so the same steps) and ar's tokens. The last
    prompt runs into max-seq 256, where the chain no longer fits and calls step by step."""
    stepwise = leapc.load(engine.path)
    programs = {k: v for k, v in engine.manifest.programs.items() if k != "draft_model_chain"}
    stepwise.manifest = engine.manifest.model_copy(update={"programs": programs})
    for prompt in (PROMPT, list(range(40, 140)), list(range(3, 200))):
        ar = engine.generate(prompt, 64)
        chained = engine.generate(prompt, 64, policy="draft", draft=DraftOptions(max_draft=8))
        stepped = stepwise.generate(prompt, 64, policy="draft", draft=DraftOptions(max_draft=8))
        assert chained.token_ids == stepped.token_ids == ar.token_ids
        assert chained.stats.steps == stepped.stats.steps
        assert "draft_model_chain" not in stepped.stats.calls
        assert chained.stats.calls["draft_model_chain"] >= chained.stats.steps - 8
        assert chained.stats.calls.get("draft_model", 0) < stepped.stats.calls["draft_model"] / 4


def test_confidence_threshold_stops_unsure_drafts_and_keeps_the_output(engine):
    ar = engine.generate(PROMPT, 64).token_ids
    depth = {}
    for confidence in (0.0, 0.02, 0.99):  # this random draft's top-1 is mostly 0.02-0.05
        run = engine.generate(PROMPT, 64, policy="draft",
                              draft=DraftOptions(max_draft=4, confidence=confidence))
        assert run.token_ids == ar
        depth[confidence] = sum(run.stats.drafted_depth) / len(run.stats.drafted_depth)
    assert depth[0.0] > depth[0.02] > depth[0.99] == 0.0


def samples(engine, policy: str, temperature: float, seeds: range,
            options: DraftOptions = DraftOptions(max_draft=4)) -> list[list[int]]:
    def draw() -> list[list[int]]:
        return [engine.generate(PROMPT, 3, policy=policy, temperature=temperature, seed=s,
                                draft=options).token_ids for s in seeds]

    if policy == "ar":  # rules 2-flat, 3 and 4 compare with the same plain draws
        return plain_samples(engine, ("draft_model", temperature, seeds, options), draw)
    return draw()


SAMPLED_DRAFTS = {  # rule -> (temperature, drafting options)
    "2-peaked": (0.5, DraftOptions(max_draft=4)),
    "2-flat": (1.0, DraftOptions(max_draft=4)),
    "3": (1.0, DraftOptions(max_draft=2, branching=(3, 2), children=ChildSampling.IID)),
    "4": (1.0, DraftOptions(max_draft=2, branching=(3, 2))),
}


@pytest.mark.parametrize("rule", SAMPLED_DRAFTS)
def test_speculative_sampling_matches_plain_sampling(engine, rule):
    """The engine's drafter hands the acceptance rule the q it really sampled from."""
    temperature, options = SAMPLED_DRAFTS[rule]
    plain = samples(engine, "ar", temperature, range(4000))
    drafted = samples(engine, "draft", temperature, range(10**6, 10**6 + 4000), options)
    for position in (1, 2):  # drafted positions: accepted drafts or residual draws
        stat, df = chi2_homogeneity([s[position] for s in plain],
                                    [s[position] for s in drafted])
        assert df >= 3
        assert stat < chi2_critical(df), (position, stat, df)


def test_rejections_happen_so_the_residual_distribution_is_exercised(engine):
    gens = [engine.generate(PROMPT, 16, policy="draft", temperature=1.0, seed=s)
            for s in range(50)]
    accepted = sum(sum(g.stats.accepted_depth) for g in gens)
    drafted = sum(sum(g.stats.drafted_depth) for g in gens)
    assert 0 < accepted < drafted
