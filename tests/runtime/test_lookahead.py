"""Lookahead decoding: window, mask, pool and candidate tree; greedy identity and rule 5."""

from __future__ import annotations

import numpy as np
import pytest
from stats import chi2_critical, chi2_homogeneity

import leapc
from leapc.ir.errors import InputError
from leapc.runtime.decode import prefill, tree_inputs
from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.lookahead import (
    JacobiWindow,
    LookaheadConfig,
    LookaheadDrafter,
    NGramPool,
    candidate_tree,
    window_size,
)
from leapc.runtime.policies import DraftOptions

REPETITIVE = ("Once upon a time, there was a little girl named Lily. She loved to play outside. "
              "Once upon a time, there was a little")


def full_window() -> JacobiWindow:
    """W = 3, N = 4: level 0 at positions 1, 2; level 1 at 1 .. 3; level 2 at 2 .. 4."""
    return JacobiWindow([np.array([11, 12]), np.array([21, 22, 23]), np.array([31, 32, 33])], 3)


def drafter(config: LookaheadConfig = LookaheadConfig(3, 4, 2)) -> LookaheadDrafter:
    return LookaheadDrafter(config, np.random.default_rng(0))


# ------------------------------------------------------------------ window


def test_config_refuses_windows_that_cannot_work():
    for bad in ((0, 4, 5), (5, 2, 5), (5, 4, 0)):
        with pytest.raises(InputError, match="W >= 1, N >= 3, G >= 1"):
            LookaheadConfig(*bad)


def test_coordinates_put_level_l_one_position_after_level_l_minus_1():
    level, position = full_window().coordinates()
    assert level.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert position.tolist() == [1, 2, 1, 2, 3, 2, 3, 4]


def test_every_window_token_attends_to_its_own_trajectory():
    # rows/columns: (0,1) (0,2) | (1,1) (1,2) (1,3) | (2,2) (2,3) (2,4)  as (level, position)
    expected = [
        [0],  # (0,1): level 0 is causal text after the root
        [0, 1],  # (0,2)
        [2],  # (1,1): produced by the root, which every row sees (outside the window)
        [0, 3],  # (1,2): produced by (0,1)
        [0, 1, 4],  # (1,3): by (0,2), whose context is (0,1)
        [2, 5],  # (2,2): by (1,1)
        [0, 3, 6],  # (2,3): by (1,2), produced by (0,1)
        [0, 1, 4, 7],  # (2,4): by (1,3) <- (0,2) <- (0,1)
    ]
    attention = full_window().attention()
    assert [np.flatnonzero(row).tolist() for row in attention] == expected


def test_ngrams_are_the_diagonals_ending_in_the_outputs():
    assert full_window().ngrams(root=7, outputs=np.array([41, 42, 43])) == [
        (7, 21, 31, 41), (11, 22, 32, 42), (12, 23, 33, 43)]


def test_a_full_window_slides_one_position_and_forgets_its_oldest_level():
    window = full_window()
    window.advance(np.array([41, 42, 43]))
    assert [level.tolist() for level in window.levels] == [[22, 23], [31, 32, 33], [41, 42, 43]]


@pytest.mark.parametrize("width, ngram", ((5, 4), (3, 5), (1, 6), (1, 3)))
def test_warm_up_fills_the_window_to_its_steady_shape(width, ngram):
    config = LookaheadConfig(width, ngram, 1)
    window = JacobiWindow.start(config, [1, 2, 3], np.random.default_rng(0))
    sizes = []
    for step in range(ngram + 2):
        sizes.append(window.size)
        assert window.size == window_size(width, ngram, len(window.levels))
        _, position = window.coordinates()
        assert position.max() == width + ngram - 3  # every level ends at the same position
        window.advance(np.full(len(window.levels[-1]), 100 + step))
    assert window.full
    assert [len(level) for level in window.levels] == [width - 1] + [width] * (ngram - 2)
    assert config.largest_window == max(sizes)


# ------------------------------------------------------------------ pool and candidate tree


def test_pool_keeps_the_most_recent_guesses_per_first_token():
    pool = NGramPool(capacity=2)
    for ngram in ((1, 2, 3), (1, 4, 5), (1, 2, 3), (1, 6, 7), (9, 2, 3)):
        pool.add(ngram)
    # (1, 2, 3) was seen again after (1, 4, 5), so (1, 4, 5) is the one evicted
    assert pool.continuations(1) == [(6, 7), (2, 3)]
    assert pool.continuations(9) == [(2, 3)]
    assert pool.continuations(5) == []


def test_candidate_tree_shares_prefixes_and_respects_the_budget():
    tokens, parents = candidate_tree(7, [(1, 2, 3), (1, 2, 4), (5, 6, 7)], budget=10)
    assert tokens.tolist() == [7, 1, 2, 3, 4, 5, 6, 7]
    assert parents == [-1, 0, 1, 2, 2, 0, 5, 6]
    tokens, parents = candidate_tree(7, [(1, 2, 3), (5, 6, 7)], budget=4)
    assert tokens.tolist() == [7, 1, 2, 3, 5]
    assert parents == [-1, 0, 1, 2, 0]


def test_draft_runs_the_window_after_the_tree_and_the_tree_never_sees_it():
    la = drafter()
    la.window = full_window()
    la.pool.add((7, 1, 2, 3))
    draft = la.propose([], 7, budget=40)
    assert draft.tokens.tolist() == [7, 1, 2, 3]
    assert draft.extra.tokens.tolist() == [11, 12, 21, 22, 23, 31, 32, 33]
    tokens, offsets, mask = draft.step_nodes()
    assert offsets.tolist() == [0, 1, 2, 3, 1, 2, 1, 2, 3, 2, 3, 4]
    assert not mask[:4, 4:].any()  # tree rows: no window columns
    assert mask[4:, 0].all() and not mask[4:, 1:4].any()  # window rows: the root, no candidate
    assert (mask[4:, 4:] == la.window.attention()).all()


def test_window_runs_only_beside_room_for_a_whole_candidate():
    la = drafter(LookaheadConfig(3, 4, 6))
    la.window = full_window()  # 8 tokens; N - 1 = 3
    for n in range(6):
        la.pool.add((7, n, 100 + n, 200 + n))
    roomy = la.propose([], 7, budget=12)
    assert roomy.extra is not None and roomy.tree.size - 1 == 4  # 12 - 8 window tokens
    tight = la.propose([], 7, budget=10)
    assert tight.extra is None and tight.tree.size - 1 == 10


def test_observe_pools_the_diagonals_then_slides():
    la = drafter(LookaheadConfig(3, 4, 2, pool_context=False))
    la.window = full_window()
    draft = la.propose([], 7, budget=40)
    extra_logits = np.zeros((8, 50))
    extra_logits[-3:][np.arange(3), [41, 42, 43]] = 1.0  # the newest level's argmax
    la.observe([7], Verification(draft, np.zeros((1, 50)), [0], [5], extra_logits))
    assert la.pool.continuations(7) == [(21, 31, 41)]
    assert la.pool.continuations(12) == [(23, 33, 43)]
    assert la.window.levels[-1].tolist() == [41, 42, 43]


def test_context_ngrams_are_pooled_once():
    la = drafter(LookaheadConfig(2, 3, 4))
    la.propose([1, 2, 3, 1, 2], 4, budget=0)
    assert la.pool.continuations(1) == [(2, 3)] and la.pool.continuations(2) == [(3, 1)]
    draft = la.propose([1, 2, 3, 1, 2], 4, budget=0)
    la.observe([1, 2, 3, 1, 2, 4], Verification(draft, np.zeros((1, 9)), [0], [2]))
    assert la.pool.continuations(1) == [(2, 4), (2, 3)]
    assert la.pool.continuations(2) == [(3, 1)]  # not added twice


# ------------------------------------------------------------------ on engines


def test_window_logits_are_those_of_each_trajectory_read_as_plain_text(engine_dir):
    """Positions and mask together: every window row computes exactly what a causal step
    over the root and its trajectory (in position order) computes."""
    engine = leapc.load(engine_dir("tiny-llama"))
    prompt = [5, 17, 200, 3, 9, 44]
    cache = engine.new_cache()
    prefill(engine.step, cache, prompt, engine.manifest.max_new)
    la = drafter()
    la.window = full_window()
    la.pool.add((7, 1, 2, 3))
    draft = la.propose(prompt, 7, budget=40)
    logits = engine.step(*tree_inputs(cache, draft))["logits"][0]
    tokens, offsets, mask = draft.step_nodes()
    for row in range(draft.tree.size, len(tokens)):
        seen = np.flatnonzero(mask[row])
        seen = seen[np.argsort(offsets[seen])]
        assert offsets[seen].tolist() == list(range(offsets[row] + 1))  # contiguous text
        text = tokens[seen].tolist()
        plain = engine.step(*tree_inputs(cache, Draft.chain_of(text[0], text[1:])))["logits"]
        np.testing.assert_allclose(logits[row], plain[0, -1], atol=1e-4)
    alone = engine.step(*tree_inputs(cache, Draft(draft.tokens, draft.tree)))["logits"][0]
    np.testing.assert_allclose(logits[: draft.tree.size], alone, atol=1e-4)


CONFIGS = (LookaheadConfig(), LookaheadConfig(5, 4, 5), LookaheadConfig(1, 5, 1))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_greedy_lookahead_is_token_identical_to_ar_on_tiny_llama(engine_dir, config):
    engine = leapc.load(engine_dir("tiny-llama"))
    for prompt in ([5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9], list(range(40, 100))):
        assert engine.generate(prompt, 64, policy="lookahead",
                               draft=DraftOptions(lookahead=config)).token_ids == \
            engine.generate(prompt, 64).token_ids


def test_lookahead_stops_at_the_token_budget_and_at_max_seq(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    for budget in (1, 2, 7):
        assert len(engine.generate([3, 4], budget, policy="lookahead").token_ids) == budget
    long_prompt = [(7 * i) % 256 for i in range(236)]  # max-seq 256: room runs out
    assert engine.generate(long_prompt, 40, policy="lookahead").token_ids == \
        engine.generate(long_prompt, 40).token_ids


@pytest.mark.slow
@pytest.mark.shared
def test_greedy_lookahead_is_token_identical_to_ar_on_stories(engine_dir):
    engine = leapc.load(engine_dir("stories"))
    for prompt in ("", "One day, Tom", REPETITIVE):
        assert engine.generate(prompt, 64, policy="lookahead").token_ids == \
            engine.generate(prompt, 64).token_ids, prompt


@pytest.mark.slow
def test_greedy_lookahead_is_token_identical_to_ar_on_the_bundled_model(engine_dir):
    from leapc.models import corpus

    engine = leapc.load(engine_dir("bundled"))
    for prompt in corpus.held_out_prompts(4):
        assert engine.generate(prompt, 64, policy="lookahead").token_ids == \
            engine.generate(prompt, 64).token_ids, prompt


@pytest.mark.slow
@pytest.mark.shared
def test_the_jacobi_window_alone_gets_tokens_accepted(engine_dir):
    """With the context's n-grams kept out of the pool, every accepted token comes from an
    n-gram the lookahead branch generated. (Windows that see only themselves get about
    0.84 of the AR steps here; the trajectory mask about 0.72.)"""
    engine = leapc.load(engine_dir("stories"))
    window_only = DraftOptions(lookahead=LookaheadConfig(5, 4, 5, pool_context=False))
    steps = {"ar": 0, "lookahead": 0}
    for prompt in (REPETITIVE, "", "One day, Tom"):
        ar = engine.generate(prompt, 96)
        lookahead = engine.generate(prompt, 96, policy="lookahead", draft=window_only)
        assert lookahead.token_ids == ar.token_ids
        steps["ar"] += ar.stats.steps
        steps["lookahead"] += lookahead.stats.steps
    assert steps["lookahead"] < 0.8 * steps["ar"], steps


@pytest.mark.slow
@pytest.mark.shared
def test_sampled_lookahead_matches_plain_sampling(engine_dir):
    """Rule 5: the 2nd and 3rd tokens, drafted from the prompt's n-grams (" named Lily"),
    follow the same distribution as plain sampling (chi-square homogeneity, alpha =
    0.001). Accepting a drafted token whenever p >= 0.2 instead fails it by far."""
    engine = leapc.load(engine_dir("stories"))
    prompt = REPETITIVE + " girl"

    def tokens(policy: str, seeds: range) -> list[tuple[int, ...]]:
        return [tuple(engine.generate(prompt, 3, policy=policy, temperature=1.0,
                                      seed=seed).token_ids[1:]) for seed in seeds]

    stat, df = chi2_homogeneity(tokens("ar", range(1500)), tokens("lookahead", range(10**6, 10**6 + 1500)))
    assert df >= 3, "the test needs a distribution with several outcomes"
    assert stat < chi2_critical(df), (stat, df)
    sampled = engine.generate(REPETITIVE, 64, policy="lookahead", temperature=0.3, seed=1)
    assert len(sampled.token_ids) == 64 and sampled.stats.tau > 1.0
