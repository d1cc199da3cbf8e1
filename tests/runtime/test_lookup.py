"""Prompt lookup: n-gram matching and draft budgets."""

from __future__ import annotations

import numpy as np

from leapc.runtime.drafters.base import AdaptiveLength, Draft, Verification
from leapc.runtime.drafters.lookup import LookupDrafter, find_continuations


def test_longest_suffix_match_wins_and_the_most_recent_occurrence_is_used():
    #            0  1  2  3  4  5  6  7  8  9
    context = np.array([7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2])
    # suffix (1, 2) occurs at 1 and 5: the later one continues with 4, 5
    assert find_continuations(context, max_ngram=3, min_ngram=1, length=3) == [[4, 5, 1]]
    # suffix (5, 1, 2)? no; (1, 2) yes — a 3-gram that matches takes precedence:
    context = np.array([5, 1, 2, 8, 0, 1, 2, 6, 5, 1, 2])
    assert find_continuations(context, 3, 1, 2) == [[8, 0]]


def test_no_match_drafts_nothing():
    assert find_continuations(np.array([1, 2, 3, 4]), 3, 1, 4) == []
    assert LookupDrafter().propose([1, 2, 3], 4, budget=5).tree.size == 1


def test_several_matches_become_a_trie_most_recent_first():
    #                        0  1  2  3  4  5  6  7  8  9 10 11 12 13
    context = np.array([1, 2, 5, 6, 1, 2, 5, 7, 1, 2, 8, 9, 1, 2])
    found = find_continuations(context, 2, 1, length=2, matches=3)
    assert found == [[8, 9], [5, 7], [5, 6]]
    draft = LookupDrafter(max_ngram=2, max_draft=2, matches=3).propose(context[:-1].tolist(), 2, budget=8)
    # depth 1: 5 and 8 (5 shared by two continuations); depth 2: 6, 7 under 5 and 9 under 8
    assert draft.tokens.tolist() == [2, 5, 8, 6, 7, 9]
    assert draft.tree.parents.tolist() == [-1, 0, 0, 1, 1, 2]


def test_a_trie_never_exceeds_the_budget():
    context = [1, 2, 5, 6, 1, 2, 5, 7, 1, 2, 8, 9, 1]
    draft = LookupDrafter(max_ngram=2, max_draft=2, matches=3).propose(context, 2, budget=3)
    assert draft.tree.size - 1 == 3
    # the most recent match (8, 9) in full, then the first token of the next one (5)
    assert draft.tokens.tolist() == [2, 5, 8, 9]
    assert draft.tree.parents.tolist() == [-1, 0, 0, 2]


def test_budget_caps_the_draft():
    draft = LookupDrafter(max_draft=8).propose([1, 2, 3, 4, 5, 1, 2], 3, budget=2)
    assert draft.tokens.tolist() == [3, 4, 5]


def _verification(drafted: int, accepted: int) -> Verification:
    draft = Draft.chain_of(0, list(range(1, drafted + 1)))
    return Verification(draft, np.zeros((drafted + 1, 4)), list(range(accepted + 1)), [])


def test_adaptive_length_grows_by_two_on_full_acceptance_and_shrinks_by_one():
    length = AdaptiveLength(maximum=8, current=3)
    length.update(_verification(drafted=3, accepted=3))
    assert length.current == 5
    length.update(_verification(drafted=5, accepted=2))
    assert length.current == 4
    for _ in range(10):
        length.update(_verification(drafted=4, accepted=0))
    assert length.current == 1  # never below one
    for _ in range(10):
        length.update(_verification(drafted=1, accepted=1))
    assert length.current == 8  # never above the maximum
    length.update(_verification(drafted=0, accepted=0))  # nothing drafted: no evidence
    assert length.current == 8


def test_adaptive_lookup_drafts_the_current_length():
    drafter = LookupDrafter(max_draft=8, adaptive=True)
    drafter.length.current = 2
    assert len(drafter.propose([1, 2, 3, 4, 5, 6, 1, 2], 3, budget=8).tokens) == 3
