"""Prompt lookup: n-gram matching, and greedy output identical to autoregressive decoding."""

from __future__ import annotations

import numpy as np
import pytest

import leapc
from leapc.runtime.drafters.lookup import LookupDrafter, find_continuation


def test_longest_suffix_match_wins_and_the_most_recent_occurrence_is_used():
    #            0  1  2  3  4  5  6  7  8  9
    context = np.array([7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2])
    # suffix (1, 2) occurs at 1 and 5: the later one continues with 4, 5
    assert find_continuation(context, max_ngram=3, min_ngram=1, length=3) == [4, 5, 1]
    # suffix (5, 1, 2)? no; (1, 2) yes — a 3-gram that matches takes precedence:
    context = np.array([5, 1, 2, 8, 0, 1, 2, 6, 5, 1, 2])
    assert find_continuation(context, 3, 1, 2) == [8, 0]


def test_no_match_drafts_nothing():
    assert find_continuation(np.array([1, 2, 3, 4]), 3, 1, 4) == []
    assert LookupDrafter().propose([1, 2, 3], 4, budget=5).tree.size == 1


def test_budget_caps_the_draft():
    draft = LookupDrafter(max_draft=8).propose([1, 2, 3, 4, 5, 1, 2], 3, budget=2)
    assert draft.tokens.tolist() == [3, 4, 5]


REPETITIVE = ("Once upon a time, there was a little girl named Lily. She loved to play outside. "
              "Once upon a time, there was a little")


@pytest.mark.parametrize("backend", ("ort", "eager"))
def test_lookup_is_token_identical_to_ar_on_stories(engine_dir, backend):
    engine = leapc.load(engine_dir("stories", backend))
    for prompt in ("", "One day, Tom", REPETITIVE):
        ar = engine.generate(prompt, 96)
        lookup = engine.generate(prompt, 96, policy="lookup")
        assert lookup.token_ids == ar.token_ids
    assert lookup.stats.tau > 1.2  # the repeated story is drafted, several tokens a step
    assert lookup.stats.steps < ar.stats.steps


@pytest.mark.parametrize("family", ("llama", "gpt2", "gemma"))
def test_lookup_is_token_identical_to_ar_on_tiny_families(engine_dir, family):
    engine = leapc.load(engine_dir(f"tiny-{family}"))
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    assert engine.generate(prompt, 40, policy="lookup").token_ids == \
        engine.generate(prompt, 40).token_ids
