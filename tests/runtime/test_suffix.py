"""SuffixDecoding: the suffix trie's counts, the longest match, the best-first tree."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leapc.ir.errors import InputError
from leapc.runtime.drafters.suffix import SuffixDrafter, SuffixTrie, speculate
from leapc.runtime.policies import POLICIES, DraftContext, DraftOptions, Policy
from leapc.runtime.sampling import SamplingConfig


def node_of(trie: SuffixTrie, path: tuple[int, ...]) -> int | None:
    node = trie.ROOT
    for token in path:
        node = trie.children(node).get(token)
        if node is None:
            return None
    return node


def stats(trie: SuffixTrie, path: tuple[int, ...]) -> tuple[int, int, int]:
    node = node_of(trie, path)
    assert node is not None, path
    return trie.count[node], trie.continued[node], trie.last[node]


def flatten(trie: SuffixTrie) -> dict[tuple[int, ...], tuple[int, int, int]]:
    """Every non-root node by path: (count, continued, last)."""
    found, stack = {}, [((), trie.ROOT)]
    while stack:
        path, node = stack.pop()
        for token, child in trie.children(node).items():
            found[path + (token,)] = (trie.count[child], trie.continued[child], trie.last[child])
            stack.append((path + (token,), child))
    return found


def rebuilt(tokens: list[int], depth: int) -> dict[tuple[int, ...], tuple[int, int, int]]:
    """The trie by its definition: every substring of at most ``depth`` tokens, its number
    of occurrences, how many a token followed (within ``depth``), its latest end."""
    found: dict[tuple[int, ...], tuple[int, int, int]] = {}
    for end in range(len(tokens)):
        for start in range(max(0, end - depth + 1), end + 1):
            path = tuple(tokens[start : end + 1])
            count, continued, _ = found.get(path, (0, 0, -1))
            followed = end + 1 < len(tokens) and len(path) < depth
            found[path] = (count + 1, continued + followed, end)
    return found


# ------------------------------------------------------------------ the trie


def test_trie_counts_every_bounded_substring():
    trie = SuffixTrie(depth=3)
    trie.extend([1, 2, 1, 2, 3])
    assert trie.length == 5 and trie.count[trie.ROOT] == 5
    assert stats(trie, (1,)) == (2, 2, 2)  # at 0 and 2, both followed; the latest ends at 2
    assert stats(trie, (1, 2)) == (2, 2, 3)  # followed by 1, then by 3
    assert stats(trie, (2,)) == (2, 2, 3)
    assert stats(trie, (1, 2, 1)) == (1, 0, 2)  # three deep: the depth bound, no children
    assert stats(trie, (3,)) == (1, 0, 4)  # the last token: nothing followed it yet
    assert node_of(trie, (1, 2, 1, 2)) is None  # deeper than the bound
    assert node_of(trie, (2, 2)) is None
    assert set(trie.children(node_of(trie, (1, 2)))) == {1, 3}


def test_the_occurrence_at_the_end_is_counted_but_has_no_continuation():
    trie = SuffixTrie(depth=4)
    trie.extend([5, 6, 5, 6])
    count, continued, _ = stats(trie, (5, 6))
    assert (count, continued) == (2, 1)
    # a path's continuations sum to its continued count
    assert sum(trie.count[c] for c in trie.children(node_of(trie, (5, 6))).values()) == continued


def test_a_suffix_trie_needs_a_depth():
    with pytest.raises(ValueError, match="depth"):
        SuffixTrie(0)


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), max_size=60), depth=st.integers(1, 6),
       cuts=st.lists(st.integers(0, 60), max_size=6))
def test_incremental_updates_equal_a_trie_built_from_scratch(tokens, depth, cuts):
    trie, done = SuffixTrie(depth), 0
    for cut in sorted(min(c, len(tokens)) for c in cuts) + [len(tokens)]:
        trie.extend(tokens[done:cut])  # observe: each step's committed tokens
        done = max(done, cut)
        assert flatten(trie) == rebuilt(tokens[:done], depth)
    assert trie.size == len(rebuilt(tokens, depth)) + 1


# ------------------------------------------------------------------ matching

def test_the_longest_suffix_with_a_continuation_is_matched():
    #              0  1  2  3  4  5  6  7  8  9
    context = [1, 2, 3, 9, 7, 2, 3, 8, 1, 2]
    trie = SuffixTrie(depth=8)
    trie.extend(context)
    node, length = trie.match(3, longest=8)  # context + [3] ends with 1 2 3, seen at 0
    assert length == 3 and node == node_of(trie, (1, 2, 3))
    assert trie.match(3, longest=2)[1] == 2  # (2, 3): at 1 and 5
    # the drafter follows the longest match: 9 7 (after 1 2 3), not 8 (after the 2 3 at 5)
    draft = SuffixDrafter(max_draft=2, alpha=1.0).propose(context, 3, budget=8)
    assert draft.tokens.tolist() == [3, 9, 7]


def test_a_suffix_seen_only_at_the_end_of_the_context_is_no_match():
    """Its one occurrence has no continuation yet; the shorter suffix's do."""
    context = [1, 2, 9, 9]
    trie = SuffixTrie(depth=8)
    trie.extend(context)
    assert node_of(trie, (9, 9)) is not None  # (9, 9) at the end: counted, not continued
    node, length = trie.match(9, longest=8)
    assert length == 1 and node == node_of(trie, (9,))
    assert SuffixDrafter(alpha=2.0).propose(context, 9, budget=8).tokens.tolist() == [9, 9]


def test_no_match_no_draft():
    drafter = SuffixDrafter()
    assert drafter.propose([1, 2, 3], 4, budget=8).tree.size == 1  # 4 never seen
    assert drafter.propose([1, 2, 3, 4], 5, budget=8).tree.size == 1
    assert SuffixDrafter().propose([7], 7, budget=8).tree.size == 1  # seen, never followed
    assert SuffixDrafter().propose([], 7, budget=8).tree.size == 1


def test_the_match_is_at_most_max_match_long():
    context = [4, 5, 6, 7, 1, 4, 5, 6]
    trie = SuffixTrie(depth=8)
    trie.extend(context)
    assert trie.match(7, longest=8)[1] == 4
    assert trie.match(7, longest=2)[1] == 2


# ------------------------------------------------------------------ the tree

# 1 2 is followed by 7 three times and by 4 once; 8 only occurs here, so the context's
# longest matched suffix with root 2 is (1, 2).
#           0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17
BRANCHY = [1, 2, 7, 9, 1, 2, 7, 9, 1, 2, 4, 9, 1, 2, 7, 9, 8, 1]


def test_the_tree_is_best_first_by_path_probability():
    trie = SuffixTrie(depth=8)
    trie.extend(BRANCHY)
    node, length = trie.match(2, longest=8)
    assert length == 2
    kept = speculate(trie, node, limit=10, depth=2, min_probability=0.1)
    assert [(ranks, token) for ranks, token, _ in kept] == \
        [((0,), 7), ((0, 0), 9), ((1,), 4), ((1, 0), 9)]
    assert [p for _, _, p in kept] == pytest.approx([0.75, 0.75, 0.25, 0.25])


def test_the_draft_orders_siblings_by_probability():
    draft = SuffixDrafter(max_draft=2, alpha=4.0).propose(BRANCHY, 2, budget=10)
    # depth 1: 7 (3 of 4) before 4 (1 of 4), though 4 < 7; depth 2: 9 under each
    assert draft.tokens.tolist() == [2, 7, 4, 9, 9]
    assert draft.tree.parents.tolist() == [-1, 0, 0, 1, 2]
    assert draft.q is None  # deterministic candidates


def test_a_path_probability_counts_only_occurrences_with_a_known_continuation():
    trie = SuffixTrie(depth=8)
    trie.extend([1, 2, 3, 1, 2, 3, 1, 2])  # (1, 2) thrice; the last one is not followed yet
    kept = speculate(trie, node_of(trie, (1,)), limit=5, depth=3, min_probability=0.1)
    assert [token for _, token, _ in kept] == [2, 3, 1]
    assert [p for _, _, p in kept] == pytest.approx([1.0, 1.0, 1.0])  # 3 followed 2 of 2


def test_equally_likely_siblings_are_ordered_most_recent_first():
    # 1 2 was followed by 3, then by 5: one each, the later first
    draft = SuffixDrafter(max_draft=1, alpha=2.0).propose([1, 2, 3, 1, 2, 5, 1], 2, budget=8)
    assert draft.tokens.tolist() == [2, 5, 3]


@pytest.mark.parametrize(("kwargs", "budget", "tokens", "parents"), [
    ({"alpha": 4.0}, 3, [2, 7, 4, 9], [-1, 0, 0, 1]),  # the budget: the likeliest three
    ({"alpha": 1.0}, 10, [2, 7, 9], [-1, 0, 1]),  # max_spec = ceil(1.0 * 2) nodes
    ({"alpha": 1.5}, 10, [2, 7, 4, 9], [-1, 0, 0, 1]),  # ceil(1.5 * 2) = 3
    ({"alpha": 4.0, "min_probability": 0.3}, 10, [2, 7, 9], [-1, 0, 1]),  # 4's 0.25 dropped
    ({"alpha": 4.0, "max_draft": 1}, 10, [2, 7, 4], [-1, 0, 0]),  # one deep
    ({"alpha": 4.0, "max_draft": 0}, 10, [2], [-1]),
    ({"alpha": 4.0}, 0, [2], [-1]),
])
def test_budget_max_spec_probability_and_depth_bound_the_tree(kwargs, budget, tokens, parents):
    draft = SuffixDrafter(**({"max_draft": 2} | kwargs)).propose(BRANCHY, 2, budget=budget)
    assert draft.tokens.tolist() == tokens
    assert draft.tree.parents.tolist() == parents


def test_settings_are_checked():
    for bad in ({"max_draft": -1}, {"alpha": 0.0}, {"max_match": 0}, {"min_probability": 1.5}):
        with pytest.raises(InputError):
            SuffixDrafter(**bad)


def test_the_policy_drafts_to_max_draft():
    def drafter(options: DraftOptions) -> SuffixDrafter:
        context = DraftContext(None, None, None, SamplingConfig(), 0, options, None)
        return POLICIES[Policy.SUFFIX].drafter(context)

    assert drafter(DraftOptions()).max_draft == 8
    made = drafter(DraftOptions(max_draft=3))
    assert made.max_draft == 3
    # a four-token match allows four nodes; max_draft stops the chain at three
    assert made.propose([1, 2, 3, 4, 5, 6, 7, 1, 2, 3], 4, budget=8).tokens.tolist() == \
        [4, 5, 6, 7]


# ------------------------------------------------------------------ drafting as the loop does


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(st.integers(0, 4), min_size=2, max_size=80),
       prompt=st.integers(1, 40), budget=st.integers(0, 12), max_draft=st.integers(0, 6),
       alpha=st.sampled_from([1.0, 1.5, 2.0, 4.0]))
def test_every_draft_is_a_seen_continuation_within_its_bounds(tokens, prompt, budget,
                                                              max_draft, alpha):
    """Fed step by step (the prompt at the first propose, then each step's committed
    tokens), the drafter drafts what a fresh one drafts on the whole context; every path
    continues the matched suffix as the context once did; no bound is passed."""
    drafter = SuffixDrafter(max_draft=max_draft, alpha=alpha, max_match=6)
    position = min(prompt, len(tokens) - 1)  # the root's index
    while position < len(tokens):
        context, root = tokens[:position], tokens[position]
        draft = drafter.propose(context, root, budget)
        fresh = SuffixDrafter(max_draft=max_draft, alpha=alpha, max_match=6)
        assert draft.tokens.tolist() == fresh.propose(context, root, budget).tokens.tolist()
        nodes = draft.tree.size - 1
        assert nodes <= budget and draft.tree.depth.max() <= max_draft
        if nodes:
            _, length = drafter.trie.match(root, 6)
            assert nodes <= math.ceil(alpha * length)
            seen = [*context, root][-length:]
            for node in range(1, draft.tree.size):
                path = draft.tokens[draft.tree.path_to(node)[1:]].tolist()
                assert _occurs(seen + path, context), (seen, path)
        # commit the draft's longest prefix that agrees with the sequence, then one more
        accepted = _agreeing(draft, tokens[position + 1 :])
        drafter.observe(tokens[: position + 1 + accepted], None)
        position += accepted + 1  # the next root: the step's bonus token


def _occurs(pattern: list[int], sequence: list[int]) -> bool:
    n = len(pattern)
    return any(sequence[i : i + n] == pattern for i in range(len(sequence) - n + 1))


def _agreeing(draft, following: list[int]) -> int:
    node, accepted = 0, 0
    for token in following:
        children = [c for c in range(draft.tree.size)
                    if draft.tree.parents[c] == node and draft.tokens[c] == token]
        if not children:
            break
        node, accepted = children[0], accepted + 1
    return accepted


def test_a_shorter_context_starts_the_trie_over():
    drafter = SuffixDrafter(alpha=2.0)
    assert drafter.propose([1, 2, 3, 1, 2, 4, 4, 4], 2, budget=8).tree.size > 1
    assert drafter.propose([5, 6, 5], 6, budget=8).tokens.tolist() == [6, 5]  # 1 2: forgotten
    assert drafter.trie.length == 3
