"""Token trees as data: one pure function from a tree to the buffers a verify step needs.

Node 0 is the root (the last committed token, whose logits verify depth-1 drafts); every
other node's parent comes before it (topological order), so the ancestor mask is lower
triangular and a chain is exactly the causal mask. Used identically at build time (a
static tree folded into a program) and at run time (drafters proposing trees), numpy
only so the torch-free runtime can use it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class TreeBuffers:
    parents: np.ndarray  # [n] int64, -1 for the root
    depth: np.ndarray  # [n] int64, root 0; position of node i = past length + depth[i]
    ancestor_mask: np.ndarray  # [n, n] bool: i attends to j iff j is i or an ancestor of i
    retrieve: np.ndarray  # [leaves, max_depth + 1] root-to-leaf node indices, padded with -1

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return bool((self.parents == np.arange(-1, self.size - 1)).all())

    def path_to(self, node: int) -> list[int]:
        """Root-to-``node`` indices (inclusive)."""
        return np.flatnonzero(self.ancestor_mask[node]).tolist()


def tree_from_parents(parents: Sequence[int]) -> TreeBuffers:
    parents = np.asarray(parents, dtype=np.int64)
    n = len(parents)
    if n == 0 or parents[0] != -1:
        raise ValueError("a tree starts with its root: parents[0] must be -1")
    if n > 1 and not all(0 <= p < i for i, p in enumerate(parents[1:], 1)):
        raise ValueError("every non-root node's parent must come before it (0 <= parent < index)")
    mask = np.eye(n, dtype=bool)
    depth = np.zeros(n, dtype=np.int64)
    for i in range(1, n):  # parents come first, so their rows are already complete
        mask[i] |= mask[parents[i]]
        depth[i] = depth[parents[i]] + 1
    return TreeBuffers(parents, depth, mask, _retrieve(parents, mask, depth))


def _retrieve(parents: np.ndarray, mask: np.ndarray, depth: np.ndarray) -> np.ndarray:
    is_leaf = np.ones(len(parents), dtype=bool)
    is_leaf[parents[1:]] = False
    leaves = np.flatnonzero(is_leaf)
    paths = np.full((len(leaves), int(depth.max()) + 1), -1, dtype=np.int64)
    for row, leaf in enumerate(leaves):
        path = np.flatnonzero(mask[leaf])  # ancestors in index order = root-to-leaf order
        paths[row, : len(path)] = path
    return paths


@functools.lru_cache(maxsize=64)
def chain(length: int) -> TreeBuffers:
    """A root followed by ``length`` drafted tokens in a line. Shared (every `ar` step and
    chain draft asks for one; building it cost ~40 µs a step), so read-only."""
    tree = tree_from_parents([-1, *range(length)])
    for array in (tree.parents, tree.depth, tree.ancestor_mask, tree.retrieve):
        array.setflags(write=False)
    return tree


def tree_from_paths(paths: Sequence[Sequence[int]]) -> tuple[TreeBuffers, np.ndarray]:
    """Medusa-style choices: each path lists the candidate rank chosen at each depth.

    ``[(0,), (1,), (0, 0)]`` means: top-1 and top-2 at depth 1, and top-1 at depth 2 under
    the top-1. Missing prefixes are added. Nodes are ordered by depth, then
    lexicographically. Returns the buffers and each node's rank (-1 for the root).
    """
    nodes = {()}
    for path in paths:
        if any(r < 0 for r in path):
            raise ValueError(f"tree path {tuple(path)} has a negative rank")
        nodes.update(tuple(path[:k]) for k in range(1, len(path) + 1))
    ordered = sorted(nodes, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(ordered)}
    parents = [-1] + [index[p[:-1]] for p in ordered[1:]]
    ranks = np.asarray([-1] + [p[-1] for p in ordered[1:]], dtype=np.int64)
    return tree_from_parents(parents), ranks
