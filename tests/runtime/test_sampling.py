"""Logits -> distribution -> token: greedy, temperature, top-k, top-p, seeded sampling."""

from __future__ import annotations

import numpy as np
import pytest

from leapc.runtime.sampling import SamplingConfig, probabilities, sample

# chi-square critical values at significance 0.001, by degrees of freedom
CHI2_CRITICAL_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467}

LOGITS5 = np.array([2.0, 1.0, 0.5, -0.3, 1.4], dtype=np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------ greedy


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(300).astype(np.float32)
    cfg = SamplingConfig()
    assert cfg.greedy
    for _ in range(3):  # never random, whatever the generator state
        assert sample(logits, cfg, rng) == int(np.argmax(logits))


def test_greedy_ignores_top_k_and_top_p():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    cfg = SamplingConfig(temperature=0.0, top_k=1, top_p=0.1)
    assert sample(logits, cfg, np.random.default_rng(0)) == 1


def test_greedy_ties_take_the_first_maximum():
    logits = np.array([0.0, 5.0, 5.0, 1.0])
    assert sample(logits, SamplingConfig(), np.random.default_rng(0)) == 1


# ------------------------------------------------------------------ temperature


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.5, 4.0])
def test_temperature_scaling_matches_softmax(temperature):
    logits = np.random.default_rng(1).standard_normal(50).astype(np.float32) * 3
    p = probabilities(logits, SamplingConfig(temperature=temperature))
    np.testing.assert_allclose(p, softmax(logits.astype(np.float64) / temperature), rtol=1e-10,
                               atol=1e-15)
    assert p.sum() == pytest.approx(1.0)


def test_probabilities_are_batched_over_leading_dims():
    logits = np.random.default_rng(2).standard_normal((3, 4, 20))
    cfg = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)
    p = probabilities(logits, cfg)
    assert p.shape == logits.shape
    for i in range(3):
        for j in range(4):
            np.testing.assert_allclose(p[i, j], probabilities(logits[i, j], cfg))
    np.testing.assert_allclose(p.sum(-1), 1.0)


def test_large_logits_do_not_overflow():
    logits = np.array([1000.0, 999.0, -1000.0])
    p = probabilities(logits, SamplingConfig(temperature=0.5))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, softmax(logits / 0.5))


# ------------------------------------------------------------------ top-k


@pytest.mark.parametrize("k", [1, 2, 5, 17, 49])
def test_top_k_keeps_exactly_k_tokens(k):
    logits = np.random.default_rng(k).standard_normal(50)  # no ties
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=k))
    kept = np.flatnonzero(p > 0)
    assert len(kept) == k
    assert set(kept) == set(np.argsort(-logits)[:k])
    # the kept tokens keep their relative odds: softmax restricted to the top k
    np.testing.assert_allclose(p[kept], softmax(logits[kept]))


@pytest.mark.parametrize("k", [0, 50, 51, 1000])
def test_top_k_zero_or_at_least_vocab_disables_it(k):
    logits = np.random.default_rng(3).standard_normal(50)
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=k))
    np.testing.assert_allclose(p, softmax(logits))


def test_top_k_applies_after_temperature():
    logits = np.random.default_rng(4).standard_normal(30)
    p = probabilities(logits, SamplingConfig(temperature=0.5, top_k=4))
    kept = np.argsort(-logits)[:4]
    assert set(np.flatnonzero(p > 0)) == set(kept)
    np.testing.assert_allclose(p[kept], softmax(logits[kept] / 0.5))


# ------------------------------------------------------------------ top-p


def nucleus(p_sorted_desc: np.ndarray, top_p: float) -> int:
    """Size of the smallest prefix of a descending distribution with mass >= top_p."""
    return int(np.searchsorted(np.cumsum(p_sorted_desc), top_p) + 1)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.62, 0.9, 0.99])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p):
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.25, 0.2]))  # sorted: .4 .25 .2 .1 .05
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=top_p))
    order = np.array([1, 3, 4, 2, 0])
    size = nucleus(np.array([0.4, 0.25, 0.2, 0.1, 0.05]), top_p)
    kept = order[:size]
    assert set(np.flatnonzero(p > 0)) == set(kept), (top_p, p)
    base = softmax(logits)
    np.testing.assert_allclose(p[kept], base[kept] / base[kept].sum())


def test_top_p_includes_the_crossing_token():
    # .4 alone is below .5; .4 + .25 crosses it, so both are kept (not only the first)
    logits = np.log(np.array([0.4, 0.25, 0.2, 0.1, 0.05]))
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.5))
    np.testing.assert_allclose(p, [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0])


def test_top_p_always_keeps_the_most_likely_token():
    logits = np.array([3.0, 0.0, -1.0])
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=1e-9))
    np.testing.assert_allclose(p, [1.0, 0.0, 0.0])


def test_top_p_on_random_distributions():
    rng = np.random.default_rng(5)
    for _ in range(50):
        logits = rng.standard_normal(40) * 2
        top_p = float(rng.uniform(0.05, 0.999))
        p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=top_p))
        base = softmax(logits)
        order = np.argsort(-base)
        size = nucleus(base[order], top_p)
        assert set(np.flatnonzero(p > 0)) == set(order[:size])
        assert p.sum() == pytest.approx(1.0)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = np.log(np.array([0.3, 0.25, 0.2, 0.15, 0.1]))
    # top-2 renormalised: .3/.55 = .545 .25/.55 = .455; top_p .5 keeps only the first
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=0.5))
    np.testing.assert_allclose(p, [1.0, 0, 0, 0, 0])


# ------------------------------------------------------------------ sampling


def test_sampling_with_a_seed_is_reproducible():
    logits = np.random.default_rng(6).standard_normal(100)
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [sample(logits, cfg, rng) for _ in range(200)]

    assert draw(123) == draw(123)
    assert draw(123) != draw(124)
    assert len(set(draw(123))) > 1  # actually random, not greedy


def test_sample_never_draws_a_filtered_token():
    logits = np.random.default_rng(7).standard_normal(30)
    cfg = SamplingConfig(temperature=2.0, top_k=6, top_p=0.8)
    allowed = set(np.flatnonzero(probabilities(logits, cfg) > 0))
    rng = np.random.default_rng(0)
    assert {sample(logits, cfg, rng) for _ in range(2000)} <= allowed


def chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the cells with p > 0, and its degrees of freedom."""
    support = p > 0
    expected = counts.sum() * p[support]
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    return statistic, int(support.sum()) - 1


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.6),
        SamplingConfig(temperature=1.0, top_k=3),
        SamplingConfig(temperature=1.0, top_p=0.8),
        SamplingConfig(temperature=1.3, top_k=4, top_p=0.9),
    ],
    ids=["t1", "t0.6", "topk3", "topp0.8", "t1.3-topk4-topp0.9"],
)
def test_samples_follow_probabilities_chi_square(cfg):
    p = probabilities(LOGITS5, cfg)
    rng = np.random.default_rng(2024)
    draws = 20_000
    counts = np.bincount([sample(LOGITS5, cfg, rng) for _ in range(draws)], minlength=5)
    assert counts.sum() == draws
    assert (counts[p == 0] == 0).all(), (counts, p)  # filtered tokens are never drawn
    statistic, df = chi_square(counts, p)
    assert df >= 1
    assert statistic < CHI2_CRITICAL_0001[df], (statistic, df, counts, p)


def test_chi_square_detects_a_wrong_distribution():
    """The statistic has power: samples at T=1 fail against the T=0.8 distribution."""
    rng = np.random.default_rng(2024)
    counts = np.bincount(
        [sample(LOGITS5, SamplingConfig(temperature=1.0), rng) for _ in range(20_000)],
        minlength=5)
    wrong = probabilities(LOGITS5, SamplingConfig(temperature=0.8))
    statistic, df = chi_square(counts, wrong)
    assert statistic > CHI2_CRITICAL_0001[df]


def test_the_smallest_accepted_temperature_keeps_any_float32_logits_finite():
    """The engine refuses temperatures below MIN_TEMPERATURE: at it, the most extreme
    float32 logits still give a distribution; below it they can give NaNs."""
    from leapc.runtime.engine import MIN_TEMPERATURE

    top = np.finfo(np.float32).max
    logits = np.array([top, -top, 0.0, 1.0], dtype=np.float32)
    p = probabilities(logits, SamplingConfig(temperature=MIN_TEMPERATURE))
    assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0)
    assert p[0] == 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        below = probabilities(logits, SamplingConfig(temperature=MIN_TEMPERATURE / 2))
    assert np.isnan(below).any()
