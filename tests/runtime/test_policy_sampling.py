"""Rule 5 (deterministic candidates) is lossless under sampling: a policy's samples follow
the same distribution as plain sampling (chi-square homogeneity, alpha = 0.001)."""

from __future__ import annotations

import pytest
from stats import chi2_critical, chi2_homogeneity, plain_samples

import leapc

PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside. "
          "Once upon a time, there was a little girl")
SAMPLES = 3000
pytestmark = [pytest.mark.slow, pytest.mark.shared]  # stories260K's engines, 6k runs a test


def second_and_third_tokens(engine, policy: str, temperature: float, seed0: int) -> list:
    def draw() -> list:
        return [tuple(engine.generate(PROMPT, 3, policy=policy, temperature=temperature,
                                      seed=seed).token_ids[1:3])
                for seed in range(seed0, seed0 + SAMPLES)]

    if policy == "ar":  # the lookup[1.5] test and the biased-sampler test share these
        return plain_samples(engine, ("policy_sampling", temperature, seed0), draw)
    return draw()


@pytest.mark.parametrize("temperature", (0.6, 1.5))  # a peaked and a flat distribution
def test_lookup_sampling_matches_plain_sampling(engine_dir, temperature):
    engine = leapc.load(engine_dir("stories"))
    plain = second_and_third_tokens(engine, "ar", temperature, 0)
    drafted = second_and_third_tokens(engine, "lookup", temperature, 10**6)
    stat, df = chi2_homogeneity(plain, drafted)
    assert df >= 3, "the test needs a distribution with several outcomes"
    assert stat < chi2_critical(df), (stat, df)


def test_the_chi_square_test_detects_a_biased_sampler(engine_dir):
    engine = leapc.load(engine_dir("stories"))
    plain = second_and_third_tokens(engine, "ar", 1.5, 0)
    hotter = second_and_third_tokens(engine, "ar", 2.0, 10**6)
    stat, df = chi2_homogeneity(plain, hotter)
    assert stat > chi2_critical(df)


def test_head_policy_sampling_matches_plain_sampling(heads_engine_dir):
    """Medusa heads propose deterministic candidates: rule 5 keeps sampling exact."""
    engine = leapc.load(heads_engine_dir("stories", "medusa"))
    plain = second_and_third_tokens(engine, "ar", 1.0, 0)
    drafted = second_and_third_tokens(engine, "medusa-dynamic", 1.0, 10**6)
    stat, df = chi2_homogeneity(plain, drafted)
    assert df >= 3, "the test needs a distribution with several outcomes"
    assert stat < chi2_critical(df), (stat, df)
