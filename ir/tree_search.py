"""Static token trees for decoding heads, chosen from measured acceptance (Sequoia's DP).

Medusa/Hydra heads propose ranked candidates at each depth; a static tree is a set of rank
paths (the format of `leapc.ir.tree.tree_from_paths`). Greedy verification follows the one
path of candidates equal to the target's tokens, so under Sequoia's assumption that
acceptance is independent across depths, a node counts with the product of the acceptance
probabilities along its path, and tau = 1 (the bonus token) + that sum over drafted nodes.

Numpy only: the torch-free runtime may import this.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from leapc.ir.tree import tree_from_paths

RankPath = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class AcceptanceTable:
    """``probs[d, r]``: P(the rank-r candidate at depth d + 1 is the target's token | its
    parent was accepted). A row sums to at most 1: at most one candidate is the target's."""

    probs: np.ndarray  # [depths, ranks] float64, read-only

    def __post_init__(self) -> None:
        probs = np.array(self.probs, dtype=np.float64)  # a copy: the caller's array may change
        if probs.ndim != 2 or probs.size == 0:
            raise ValueError(f"acceptance table must be a non-empty [depths, ranks] array, "
                             f"got shape {probs.shape}")
        if not np.all((probs >= 0) & (probs <= 1)):  # also refuses NaN
            raise ValueError("acceptance probabilities must lie in [0, 1]")
        sums = probs.sum(axis=1)
        if np.any(sums > 1 + 1e-9):
            depth = int(np.argmax(sums)) + 1
            raise ValueError(f"acceptance probabilities at depth {depth} sum to "
                             f"{sums[depth - 1]:.6g} > 1: at most one candidate can match")
        probs.flags.writeable = False
        object.__setattr__(self, "probs", probs)

    @property
    def depths(self) -> int:
        return self.probs.shape[0]

    @property
    def ranks(self) -> int:
        return self.probs.shape[1]

    @classmethod
    def from_counts(cls, hits: np.ndarray, trials: np.ndarray) -> AcceptanceTable:
        """``hits[d, r]`` acceptances of rank r at depth d + 1 out of ``trials[d]`` times its
        parent was accepted; a depth never reached (no trials) gets probability 0."""
        hits = np.asarray(hits, dtype=np.float64)
        trials = np.asarray(trials, dtype=np.float64)
        if hits.ndim != 2 or trials.shape != hits.shape[:1]:
            raise ValueError(f"hits must be [depths, ranks] and trials [depths], got shapes "
                             f"{hits.shape} and {trials.shape}")
        if np.any(trials < 0):
            raise ValueError("trial counts must be non-negative")
        probs = np.divide(hits, trials[:, None], out=np.zeros_like(hits),
                          where=trials[:, None] > 0)
        return cls(probs)

    def to_json(self) -> list[list[float]]:
        return self.probs.tolist()

    @classmethod
    def from_json(cls, rows: Sequence[Sequence[float]]) -> AcceptanceTable:
        return cls(np.asarray(rows, dtype=np.float64))


def expected_accepted(table: AcceptanceTable, paths: Sequence[Sequence[int]]) -> float:
    """Expected drafted tokens accepted from the tree ``tree_from_paths(paths)`` builds
    (missing prefixes added, duplicates once); nodes outside the table count 0."""
    tree, ranks = tree_from_paths(paths)
    reach = np.ones(tree.size)  # P(node accepted) = product of p along its path
    for node in range(1, tree.size):  # parents come first
        row, rank = tree.depth[node] - 1, ranks[node]
        inside = row < table.depths and rank < table.ranks
        reach[node] = reach[tree.parents[node]] * (table.probs[row, rank] if inside else 0.0)
    return float(reach[1:].sum())


@dataclass(frozen=True, eq=False)
class _Plan:
    """Sequoia's dynamic program solved for every budget up to ``nodes``.

    ``best[d, n]`` is the largest expected number of accepted nodes in a forest of at most
    n nodes hung below an accepted node whose children use table row d (the root's children
    use row 0), counted relative to that node being accepted. A child of rank r with a
    subtree of m nodes (itself included) is accepted with p[d, r], and then its own forest
    of m - 1 nodes counts relative to it:

        gain(d, r, m) = p[d, r] * (1 + best[d + 1, m - 1]),    best[depths, n] = 0.

    The children of one node have distinct ranks and independent subtrees, so best[d, n] is
    a knapsack over the ranks: each rank is left out (m = 0) or takes m >= 1 of the n nodes,

        K[r, n] = max(K[r + 1, n], max_{1 <= m <= n} gain(d, r, m) + K[r + 1, n - m]),

    with K[ranks, n] = 0 and best[d, n] = K[0, n]. No rank order is assumed: the knapsack
    tries every subset of ranks. ``size[d, r, n]`` records the m chosen at K[r, n] so the
    tree can be rebuilt. Cost: depths * ranks max-plus products of (nodes + 1)^2 entries.
    """

    best: np.ndarray  # [depths + 1, nodes + 1]
    size: np.ndarray  # [depths, ranks, nodes + 1] int64

    @classmethod
    def solve(cls, table: AcceptanceTable, nodes: int) -> _Plan:
        best = np.zeros((table.depths + 1, nodes + 1))
        size = np.zeros((table.depths, table.ranks, nodes + 1), dtype=np.int64)
        for d in reversed(range(table.depths)):
            knapsack = np.zeros(nodes + 1)  # K[ranks, n]: no rank left, nothing gained
            for r in reversed(range(table.ranks)):
                gain = np.concatenate([[0.0], table.probs[d, r] * (1 + best[d + 1, :-1])])
                knapsack, size[d, r] = _add_item(gain, knapsack)
            best[d] = knapsack
        return cls(best, size)

    def paths(self, nodes: int) -> tuple[RankPath, ...]:
        return tuple(sorted(self._grow((), nodes, 0), key=lambda path: (len(path), path)))

    def _grow(self, prefix: RankPath, budget: int, row: int) -> Iterator[RankPath]:
        if row == self.size.shape[0]:
            return
        for rank, sizes in enumerate(self.size[row]):  # replays K[0, n], K[1, n - m], ...
            m = int(sizes[budget])
            if m:
                yield prefix + (rank,)
                yield from self._grow(prefix + (rank,), m - 1, row + 1)
                budget -= m


def _add_item(gain: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One knapsack step: out[n] = max_{0 <= m <= n} gain[m] + rest[n - m] and its argmax.

    gain[0] = 0 is leaving the item out. argmax takes the first maximum, so on a tie the item
    is left out, or given the fewest nodes: zero-probability nodes are never placed.
    """
    n = np.arange(len(rest))
    left = n[:, None] - n[None, :]  # nodes left for the other items when this one takes m
    totals = np.where(left >= 0, gain[None, :] + rest[np.maximum(left, 0)], -np.inf)
    chosen = np.argmax(totals, axis=1)
    return totals[n, chosen], chosen


def optimal_tree(table: AcceptanceTable, nodes: int) -> tuple[RankPath, ...]:
    """The tree of at most ``nodes`` drafted nodes (root not counted) maximising
    `expected_accepted`, as rank paths in `tree_from_paths` order (by depth, then
    lexicographic; every node listed).

    It has exactly ``nodes`` nodes unless the table has fewer paths of positive probability
    (within its depths and ranks); then it is all of those and no more: a node that cannot
    be accepted only costs verify time, and heads cannot draft beyond their depth.
    """
    if nodes < 0:
        raise ValueError(f"a tree cannot have {nodes} nodes")
    return _Plan.solve(table, nodes).paths(nodes)


@dataclass(frozen=True)
class Budget:
    nodes: int  # drafted nodes budgeted (the verify step runs nodes + 1); paths may be fewer
    paths: tuple[RankPath, ...]  # the optimal tree for that budget
    expected_tau: float
    predicted_tokens_per_s: float
    curve: tuple[tuple[int, float, float], ...]  # (nodes, expected_tau, tokens/s) per measured N


def best_budget(table: AcceptanceTable, step_seconds: Mapping[int, float],
                fixed_seconds: float = 0.0) -> Budget:
    """The node budget maximising predicted tokens/s = tau / seconds per step.

    ``step_seconds[N]`` is the measured time of one verify step over N tree nodes (N - 1
    drafted plus the root); only measured N are candidates. ``fixed_seconds`` is the
    drafting cost of a step that drafts, so it is not charged at N = 1 (plain
    autoregressive decoding drafts nothing). On a tie the smaller tree wins.
    """
    if not step_seconds:
        raise ValueError("step_seconds is empty: measure at least one verify step size")
    if min(step_seconds) < 1:
        raise ValueError(f"step sizes count the root, so N >= 1; got {min(step_seconds)}")
    if not all(seconds > 0 for seconds in step_seconds.values()):
        raise ValueError("every measured step time must be positive")
    if fixed_seconds < 0:
        raise ValueError(f"fixed_seconds must be non-negative, got {fixed_seconds}")
    plan = _Plan.solve(table, max(step_seconds) - 1)
    curve = tuple(_point(plan, size - 1, seconds + (fixed_seconds if size > 1 else 0.0))
                  for size, seconds in sorted(step_seconds.items()))
    nodes, tau, rate = max(curve, key=lambda point: point[2])  # first maximum: fewest nodes
    return Budget(nodes, plan.paths(nodes), tau, rate, curve)


def _point(plan: _Plan, nodes: int, seconds: float) -> tuple[int, float, float]:
    tau = 1.0 + float(plan.best[0, nodes])
    return nodes, tau, tau / seconds
