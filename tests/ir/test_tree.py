"""Tree buffers against a brute-force ancestor computation (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leapc.ir.tree import chain, tree_from_parents, tree_from_paths


@st.composite
def parent_arrays(draw, max_nodes: int = 40):
    n = draw(st.integers(1, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


def brute_ancestors(parents: list[int], node: int) -> set[int]:
    found = {node}
    while parents[node] != -1:
        node = parents[node]
        found.add(node)
    return found


@settings(max_examples=200, deadline=None)
@given(parent_arrays())
def test_mask_depth_and_paths_match_brute_force(parents):
    tree = tree_from_parents(parents)
    n = len(parents)
    for i in range(n):
        ancestors = brute_ancestors(parents, i)
        assert set(np.flatnonzero(tree.ancestor_mask[i])) == ancestors
        assert tree.depth[i] == len(ancestors) - 1
        assert tree.path_to(i)[0] == 0 and tree.path_to(i)[-1] == i
    assert not np.triu(tree.ancestor_mask, 1).any()  # topological: lower triangular
    leaves = {i for i in range(n) if i not in parents[1:]}
    assert {row[row >= 0][-1] for row in tree.retrieve} == leaves
    for row in tree.retrieve:
        path = row[row >= 0]
        assert all(parents[b] == a for a, b in zip(path[:-1], path[1:], strict=True))


def test_chain_is_the_causal_mask():
    tree = chain(4)
    assert np.array_equal(tree.ancestor_mask, np.tri(5, dtype=bool))
    assert tree.depth.tolist() == [0, 1, 2, 3, 4]
    assert tree.retrieve.tolist() == [[0, 1, 2, 3, 4]]


def test_medusa_paths_order_nodes_by_depth_and_add_prefixes():
    tree, ranks = tree_from_paths([(1,), (0, 0), (0,), (0, 1, 0)])
    # nodes: root, (0,), (1,), (0,0), (0,1), (0,1,0)
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 4]
    assert ranks.tolist() == [-1, 0, 1, 0, 1, 0]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert sorted(map(tuple, tree.retrieve.tolist())) == [(0, 1, 3, -1), (0, 1, 4, 5), (0, 2, -1, -1)]


@pytest.mark.parametrize("parents, message", [
    ([], "root"), ([0, 0], "root"), ([-1, 1], "before it"), ([-1, 0, 3, 1], "before it"),
])
def test_malformed_trees_are_refused(parents, message):
    with pytest.raises(ValueError, match=message):
        tree_from_parents(parents)


def test_negative_rank_is_refused():
    with pytest.raises(ValueError, match="negative rank"):
        tree_from_paths([(0, -1)])
