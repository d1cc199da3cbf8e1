"""Static tree search against hand examples and brute-force enumeration of every tree."""

from __future__ import annotations

import json
import time
from itertools import product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leapc.ir.tree_search import AcceptanceTable, best_budget, expected_accepted, optimal_tree

SMALL = AcceptanceTable(np.array([[0.6, 0.3], [0.5, 0.2]]))


@st.composite
def tables(draw, max_depths: int = 3, max_ranks: int = 3) -> AcceptanceTable:
    """Rows of tenths-like weights (ties and zeros are common) with some mass left over."""
    depths, ranks = draw(st.integers(1, max_depths)), draw(st.integers(1, max_ranks))
    rows = []
    for _ in range(depths):
        weights = np.array(draw(st.lists(st.integers(0, 10), min_size=ranks, max_size=ranks)))
        total = weights.sum() + draw(st.integers(0, 10))
        rows.append(weights / total if total else weights.astype(float))
    return AcceptanceTable(np.array(rows))


def path_probability(table: AcceptanceTable, path: tuple[int, ...]) -> float:
    return float(np.prod([table.probs[d, r] for d, r in enumerate(path)]))


def all_trees(table: AcceptanceTable, nodes: int) -> set[frozenset]:
    """Every prefix-closed set of at most ``nodes`` rank paths inside the table, grown one
    node at a time from the empty tree."""
    level, found = {frozenset()}, {frozenset()}
    for _ in range(nodes):
        level = {tree | {path} for tree in level for path in _frontier(table, tree)}
        found |= level
    return found


def _frontier(table: AcceptanceTable, tree: frozenset) -> list[tuple[int, ...]]:
    parents = [()] + [path for path in tree if len(path) < table.depths]
    children = [parent + (r,) for parent in parents for r in range(table.ranks)]
    return [child for child in children if child not in tree]


@pytest.mark.parametrize("paths, expected", [
    ([], 0.0),
    ([(0,)], 0.6),
    ([(0,), (1,), (0, 0)], 0.6 + 0.3 + 0.6 * 0.5),
    ([(1, 1)], 0.3 + 0.3 * 0.2),  # the missing prefix (1,) is added
    ([(0,), (0,), (0, 1), (0, 1)], 0.6 + 0.6 * 0.2),  # duplicates count once
    ([(2,), (0, 5), (0, 0, 0)], 0.6 + 0.6 * 0.5),  # outside the table: rank 2, depth 3
])
def test_expected_accepted_hand_examples(paths, expected):
    assert expected_accepted(SMALL, paths) == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(tables(), st.integers(0, 7))
def test_the_dp_equals_brute_force(table, nodes):
    best = max(sum(path_probability(table, p) for p in tree) for tree in all_trees(table, nodes))
    tree = optimal_tree(table, nodes)
    assert expected_accepted(table, tree) == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert tree == tuple(sorted(set(tree), key=lambda p: (len(p), p)))  # tree_from_paths order
    assert all(p[:-1] in tree for p in tree if len(p) > 1)  # every node listed
    # exactly `nodes` nodes unless fewer can be accepted at all, and none that cannot
    useful = [p for n in range(1, table.depths + 1) for p in product(range(table.ranks), repeat=n)
              if path_probability(table, p) > 0]
    assert len(tree) == min(nodes, len(useful))
    assert all(path_probability(table, p) > 0 for p in tree)


def test_value_rises_with_every_node_while_useful_nodes_remain():
    table = AcceptanceTable(np.random.default_rng(1).dirichlet(np.ones(6), size=4)[:, :5])
    values = [expected_accepted(table, optimal_tree(table, n)) for n in range(41)]
    assert all(b > a for a, b in zip(values[:-1], values[1:], strict=True))


@pytest.mark.parametrize("nodes, expected", [
    (2, ((0,), (0, 0))),
    (10, ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))),  # heads cannot draft past depth 4
])
def test_a_certain_top_candidate_gives_a_chain(nodes, expected):
    probs = np.zeros((4, 3))
    probs[:, 0] = 1.0
    assert optimal_tree(AcceptanceTable(probs), nodes) == expected


def test_a_certain_first_depth_spends_the_rest_below_it():
    table = AcceptanceTable(np.array([[1.0, 0.0, 0.0], [0.5, 0.3, 0.2]]))
    assert optimal_tree(table, 4) == ((0,), (0, 0), (0, 1), (0, 2))
    assert expected_accepted(table, optimal_tree(table, 4)) == pytest.approx(2.0)


def test_ranks_need_not_be_sorted_by_probability():
    table = AcceptanceTable(np.array([[0.1, 0.7, 0.2], [0.0, 0.0, 0.9]]))
    assert optimal_tree(table, 1) == ((1,),)
    assert optimal_tree(table, 2) == ((1,), (1, 2))


@pytest.mark.parametrize("deep, expected", [
    (0.9, ((0,), (0, 0))),  # 0.5 + 0.5 * 0.9 = 0.95 beats 0.5 + 0.4
    (0.7, ((0,), (1,))),  # 0.5 + 0.5 * 0.7 = 0.85 does not
])
def test_depth_versus_width_follows_the_deeper_row(deep, expected):
    table = AcceptanceTable(np.array([[0.5, 0.4], [deep, 0.0]]))
    assert optimal_tree(table, 2) == expected


def test_largest_search_is_fast():
    table = AcceptanceTable(np.random.default_rng(2).dirichlet(np.ones(17), size=8)[:, :16])
    start = time.perf_counter()
    tree = optimal_tree(table, 128)
    assert time.perf_counter() - start < 1.0
    assert len(tree) == 128


def test_best_budget_picks_the_argmax_of_the_curve():
    # taus at 0, 1, 3, 7 nodes: 1.0, 1.6, 2.2, 2.53 -> tokens/s 1.0, 1.45, 1.69, 1.27
    step_seconds = {1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0}
    budget = best_budget(SMALL, step_seconds)
    expected_curve = []
    for size, seconds in step_seconds.items():
        tau = 1 + expected_accepted(SMALL, optimal_tree(SMALL, size - 1))
        expected_curve.append((size - 1, tau, tau / seconds))
    assert np.allclose(budget.curve, expected_curve)
    assert budget.nodes == 3 and budget.paths == optimal_tree(SMALL, 3)
    assert budget.expected_tau == pytest.approx(2.2)
    assert budget.predicted_tokens_per_s == pytest.approx(2.2 / 1.3)


def test_best_budget_returns_no_tree_when_drafting_never_pays():
    budget = best_budget(SMALL, {1: 1.0, 2: 2.0, 4: 4.0})
    assert (budget.nodes, budget.paths, budget.expected_tau) == (0, (), 1.0)
    assert budget.predicted_tokens_per_s == 1.0


def test_drafting_cost_is_charged_only_to_steps_that_draft():
    step_seconds = {1: 1.0, 4: 1.3}
    assert best_budget(SMALL, step_seconds, fixed_seconds=0.2).nodes == 3  # 2.2 / 1.5 > 1
    budget = best_budget(SMALL, step_seconds, fixed_seconds=1.0)  # 2.2 / 2.3 < 1
    assert budget.nodes == 0 and budget.predicted_tokens_per_s == 1.0
    assert budget.curve[1][2] == pytest.approx(2.2 / 2.3)


def test_from_counts_divides_by_trials_and_zeroes_unreached_depths():
    table = AcceptanceTable.from_counts(np.array([[6, 3], [0, 0]]), np.array([10, 0]))
    assert table.probs.tolist() == [[0.6, 0.3], [0.0, 0.0]]


def test_json_round_trip_and_the_table_is_an_immutable_copy():
    source = np.array([[0.6, 0.3], [0.5, 0.2]])
    table = AcceptanceTable(source)
    source[0, 0] = 0.0
    again = AcceptanceTable.from_json(json.loads(json.dumps(table.to_json())))
    assert np.array_equal(again.probs, table.probs) and table.probs[0, 0] == 0.6
    with pytest.raises(ValueError, match="read-only"):
        table.probs[0, 0] = 0.1


@pytest.mark.parametrize("probs, message", [
    ([0.5, 0.5], r"\[depths, ranks\] array, got shape \(2,\)"),
    (np.zeros((0, 3)), "non-empty"),
    ([[0.5, -0.1]], r"in \[0, 1\]"),
    ([[0.5, float("nan")]], r"in \[0, 1\]"),
    ([[0.5, 0.5], [0.7, 0.4]], "depth 2 sum to 1.1 > 1"),
])
def test_malformed_tables_are_refused(probs, message):
    with pytest.raises(ValueError, match=message):
        AcceptanceTable(probs)


@pytest.mark.parametrize("hits, trials, message", [
    ([[1, 2]], [3, 4], "hits must be"),
    ([1, 2], [3], "hits must be"),
    ([[1, 2]], [-3], "non-negative"),
    ([[3, 2]], [4], "sum to 1.25 > 1"),
])
def test_malformed_counts_are_refused(hits, trials, message):
    with pytest.raises(ValueError, match=message):
        AcceptanceTable.from_counts(np.array(hits), np.array(trials))


@pytest.mark.parametrize("step_seconds, fixed, message", [
    ({}, 0.0, "empty"),
    ({0: 1.0}, 0.0, "N >= 1"),
    ({1: 1.0, 2: 0.0}, 0.0, "positive"),
    ({1: 1.0}, -0.5, "non-negative"),
])
def test_malformed_budgets_are_refused(step_seconds, fixed, message):
    with pytest.raises(ValueError, match=message):
        best_budget(SMALL, step_seconds, fixed)


def test_a_negative_node_count_is_refused():
    with pytest.raises(ValueError, match="cannot have -1 nodes"):
        optimal_tree(SMALL, -1)
