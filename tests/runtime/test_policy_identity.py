"""Every lossless policy emits exactly what greedy autoregressive decoding emits."""

from __future__ import annotations

import pytest
from engines import TRAINING_FREE
from families import family_params

import leapc

# Training-free (every engine has them); lookahead's identity tests: test_lookahead.py.
POLICIES = tuple(p for p in TRAINING_FREE if p not in ("ar", "lookahead"))
STORIES_POLICIES = (*POLICIES, "draft", "retrieval")  # draft: its own first 4 of 5 layers
REPETITIVE = ("Once upon a time, there was a little girl named Lily. She loved to play outside. "
              "Once upon a time, there was a little")


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("backend", ("ort", "eager"))
@pytest.mark.parametrize("policy", STORIES_POLICIES)
def test_policy_is_token_identical_to_ar_on_stories(engine_dir, policy, backend):
    engine = leapc.load(engine_dir("stories", backend))
    steps = {}
    for prompt in ("", "One day, Tom", REPETITIVE):
        ar = engine.generate(prompt, 96)
        other = engine.generate(prompt, 96, policy=policy)
        assert other.token_ids == ar.token_ids, prompt
        steps[prompt] = (ar.stats.steps, other.stats.steps)
    # drafting must pay off somewhere: fewer target calls than tokens on the repeated story
    ar_steps, policy_steps = steps[REPETITIVE]
    assert policy_steps < 0.85 * ar_steps


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", family_params(("llama", "gpt2", "gemma")))
def test_policy_is_token_identical_to_ar_on_tiny_families(engine_dir, family, policy):
    engine = leapc.load(engine_dir(f"tiny-{family}"))
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    assert engine.generate(prompt, 40, policy=policy).token_ids == \
        engine.generate(prompt, 40).token_ids


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_stops_at_the_token_budget_and_eos(engine_dir, policy):
    engine = leapc.load(engine_dir("stories"))
    for budget in (1, 2, 7):
        assert len(engine.generate(REPETITIVE, budget, policy=policy).token_ids) == budget
    # Stop at EOS: make a token the AR output emits at index 10 the engine's EOS.
    first = engine.generate(REPETITIVE, 64).token_ids
    eos = first[10]
    tokenizer = engine.manifest.tokenizer.model_copy(update={"eos_ids": (eos,)})
    engine.manifest = engine.manifest.model_copy(update={"tokenizer": tokenizer})
    expected = first[: first.index(eos) + 1]
    assert engine.generate(REPETITIVE, 64).token_ids == expected
    assert engine.generate(REPETITIVE, 64, policy=policy).token_ids == expected


@pytest.mark.slow
@pytest.mark.shared
def test_adaptive_lookup_is_token_identical_to_ar(engine_dir):
    from leapc.runtime.policies import DraftOptions

    engine = leapc.load(engine_dir("stories"))
    ar = engine.generate(REPETITIVE, 96)
    adaptive = engine.generate(REPETITIVE, 96, policy="lookup",
                               draft=DraftOptions(max_draft=12, adaptive=True))
    assert adaptive.token_ids == ar.token_ids
    assert adaptive.stats.steps < ar.stats.steps


@pytest.mark.slow
@pytest.mark.parametrize("policy", ("lookup", "recycle", "draft", "retrieval"))
def test_policy_is_token_identical_to_ar_on_the_bundled_model(engine_dir, policy):
    from leapc.models import corpus

    engine = leapc.load(engine_dir("bundled"))
    if policy not in [p.value for p in engine.manifest.policies]:
        pytest.skip(f"the bundled engine has no {policy!r} policy (bundled draft model absent)")
    for prompt in corpus.held_out_prompts(8):
        assert engine.generate(prompt, 64, policy=policy).token_ids == \
            engine.generate(prompt, 64).token_ids, prompt
