"""Chi-square homogeneity test for "these two samplers draw from the same distribution"."""

from __future__ import annotations

from collections import Counter

import numpy as np


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper critical value (Wilson–Hilferty); z = 3.09 is a one-sided alpha of 0.001."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def chi2_homogeneity(a: list, b: list, min_expected: float = 5.0) -> tuple[float, int]:
    """Statistic and degrees of freedom; categories too rare to test are pooled."""
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    keys = set(ca) | set(cb)
    pooled = {k: ca[k] + cb[k] for k in keys}
    frac_a = na / (na + nb)
    common = [k for k in keys if min(frac_a, 1 - frac_a) * pooled[k] >= min_expected]
    rare_a = na - sum(ca[k] for k in common)
    rare_b = nb - sum(cb[k] for k in common)
    rows = [(ca[k], cb[k]) for k in common] + ([(rare_a, rare_b)] if rare_a + rare_b else [])
    stat = 0.0
    for oa, ob in rows:
        total = oa + ob
        ea, eb = total * frac_a, total * (1 - frac_a)
        stat += (oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb
    return stat, len(rows) - 1


def chi2_goodness_of_fit(samples: list, expected: dict, min_expected: float = 5.0
                         ) -> tuple[float, int]:
    """Statistic and degrees of freedom of ``samples`` against exact probabilities;
    categories with fewer than ``min_expected`` expected counts are pooled."""
    counts, n = Counter(samples), len(samples)
    assert set(counts) <= set(expected), "a sample outside the support"
    common = [k for k, prob in expected.items() if prob * n >= min_expected]
    rare_prob = 1.0 - sum(expected[k] for k in common)
    rows = [(counts[k], expected[k] * n) for k in common]
    if rare_prob * n > 1e-9:
        rows.append((n - sum(counts[k] for k in common), rare_prob * n))
    stat = sum((observed - exp) ** 2 / exp for observed, exp in rows)
    return stat, len(rows) - 1


STORY_PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play "
                "outside. Once upon a time, there was a little girl")


_PLAIN: dict = {}


def plain_samples(engine, key: tuple, draw) -> list:
    """``draw()``: plain (``ar``) samples of ``engine``, drawn once per engine directory and
    ``key`` (they are a function of the seeds; several tests compare drafting policies with
    the same plain draws). Only for ``ar``: a drafting policy's draws are never reused (a
    test may have patched its drafter)."""
    key = (str(engine.path), *key)
    if key not in _PLAIN:
        _PLAIN[key] = draw()
    return _PLAIN[key]


def second_and_third(engine, policy: str, seed0: int, draft, samples: int = 2000) -> list:
    """Tokens 2 and 3 sampled at temperature 1 after ``STORY_PROMPT``, one seed each: the
    outcomes a chi-square test compares between a drafting policy and plain sampling
    (token 1 comes from prefill alone, so it does not exercise the drafter)."""
    def draw() -> list:
        return [tuple(engine.generate(STORY_PROMPT, 3, policy=policy, temperature=1.0,
                                      seed=seed, draft=draft).token_ids[1:3])
                for seed in range(seed0, seed0 + samples)]

    if policy == "ar":
        return plain_samples(engine, ("second_and_third", seed0, draft, samples), draw)
    return draw()


def with_uniform_q(monkeypatch, drafter_class) -> None:
    """Acceptance told ``drafter_class``'s drafts came from a uniform q (a wrong q)."""
    import dataclasses

    import numpy as np

    propose = drafter_class.propose

    def wrong_q(self, *args):
        draft = propose(self, *args)
        if draft.q is None:  # nothing drafted
            return draft
        return dataclasses.replace(draft, q=np.full_like(draft.q, 1 / draft.q.shape[1]))

    monkeypatch.setattr(drafter_class, "propose", wrong_q)
