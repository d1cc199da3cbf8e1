"""Drafters' top-k: the order of a stable descending sort, distinct tokens, right log-probs."""

import numpy as np
import pytest

from leapc.runtime.drafters.ranking import top_candidates, top_tokens


@pytest.mark.parametrize("shape, k", [((8192,), 1), ((2, 3, 50), 1), ((8192,), 5), ((4, 300), 8), ((2, 3, 50), 50)])
def test_top_tokens_are_a_stable_descending_sort_cut_to_k(shape, k):
    # small integers: many ties, which must go to the lower token id
    logits = np.random.default_rng(0).integers(-4, 4, shape).astype(np.float32)
    expected = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(top_tokens(logits, k), expected)


def test_top_tokens_stay_distinct_past_the_finite_logits():
    logits = np.full((2, 6), -np.inf, dtype=np.float32)
    logits[0, 4] = 1.0
    top = top_tokens(logits, 4)
    assert top[0, 0] == 4
    assert all(len(set(row)) == 4 for row in top.tolist())


def test_k_beyond_the_vocabulary_gives_every_token():
    assert top_tokens(np.asarray([0.5, 2.0, 1.0]), 10).tolist() == [1, 2, 0]


def test_top_candidates_carry_their_log_probabilities():
    logits = np.random.default_rng(1).standard_normal((3, 1000)).astype(np.float32)
    top, logp = top_candidates(logits, 4)
    z = logits.astype(np.float64)
    log_softmax = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - z.max(-1, keepdims=True)
    np.testing.assert_allclose(logp, np.take_along_axis(log_softmax, top, -1), atol=1e-5)
    assert (np.diff(logp, axis=-1) <= 0).all()
