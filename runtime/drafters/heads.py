"""Decoding-head drafters (Medusa, Hydra): a token tree from the heads at the last accepted node.

After a verify step, the last accepted node's LM-head logits chose the new root (the
bonus token), and head k at that node proposes depth k of the next draft: Medusa heads
from the hidden state alone (one call gives every depth), Hydra heads also from the
token at depth k - 1 (one call per depth, over every node of that depth that grows).

Trees are static (rank paths, as Medusa ships: `leapc build --tree`) or dynamic in the
EAGLE-2 manner: each depth expands the ``beam`` best nodes so far by cumulative head
log-probability, each into its ``beam`` best children, and the draft keeps the ``total``
best nodes of all generated. A node's score is at most its parent's, so the best nodes
always include their ancestors. Candidates are deterministic: lossless under greedy
acceptance (rule 1) and sampled acceptance (rule 5) alike.

The first draft reads the last prefill call's outputs (`ReadsPrefill`): the heads at the
last prompt token propose the tokens after the first new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leapc.ir.head_spec import HeadKind, HeadPlacement
from leapc.ir.tree import TreeBuffers, tree_from_parents, tree_from_paths
from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.ranking import top_candidates
from leapc.runtime.step import StepFunction


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2 tree growth: ``total`` drafted nodes kept, ``beam`` expanded per depth."""

    total: int = 16
    beam: int = 4


@dataclass
class HeadsDrafter:
    kind: HeadKind
    num_heads: int
    placement: HeadPlacement
    program: StepFunction | None  # the ``heads`` program (PROGRAM placement)
    tree: tuple[tuple[int, ...], ...] = ()  # static rank paths; empty with ``dynamic``
    dynamic: DynamicTree | None = None
    _state: np.ndarray | None = field(default=None, init=False)  # at the last accepted node:
    # hidden [H] (PROGRAM placement) or head logits [K, V] (STEP placement)
    _medusa_top: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False)
    _static: tuple[TreeBuffers, np.ndarray] | None = field(default=None, init=False)

    def __post_init__(self):
        if self.dynamic is None:
            self._static = tree_from_paths(self.tree)
            if int(self._static[0].depth.max()) > self.num_heads:
                raise ValueError(f"a tree of depth {int(self._static[0].depth.max())} needs "
                                 f"more than the {self.num_heads} heads")

    # ---------------------------------------------------------------- verification

    def observe(self, context: list[int], result: Verification) -> None:
        self._remember(result.outputs, result.path[-1])

    def observe_prefill(self, outputs: dict[str, np.ndarray]) -> None:
        self._remember(outputs, -1)

    def _remember(self, outputs: dict[str, np.ndarray], row: int) -> None:
        """Keep what the heads need at step row ``row``: the last accepted node's."""
        if self.placement is HeadPlacement.STEP:
            self._state = outputs["head_logits"][:, 0, row]
        else:
            self._state = outputs["hidden"][0, row]
        self._medusa_top = None

    # ---------------------------------------------------------------- candidates

    def _candidates(self, depth: int, parents: np.ndarray, width: int):
        """Top ``width`` tokens (and log-probs) at ``depth`` under each parent token."""
        if self.kind is HeadKind.HYDRA:
            hidden = np.broadcast_to(self._state, (len(parents), len(self._state)))
            out = self.program(np.ascontiguousarray(hidden), parents.astype(np.int64),
                               np.asarray([depth - 1], dtype=np.int64))
            return top_candidates(out["head_logits"][0], width)
        tokens, scores = (ranked[depth - 1 : depth] for ranked in self._medusa(width))
        return (np.broadcast_to(tokens, (len(parents), width)),
                np.broadcast_to(scores, (len(parents), width)))

    def _medusa(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Every head's ``width`` best tokens and log-probs at the last accepted node,
        computed once per draft."""
        if self._medusa_top is None or self._medusa_top[0].shape[-1] != width:
            if self.placement is HeadPlacement.STEP:
                logits = self._state
            else:
                logits = self.program(self._state[None])["head_logits"][:, 0]
            self._medusa_top = top_candidates(logits, width)
        return self._medusa_top

    # ---------------------------------------------------------------- drafting

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        if self._state is None or budget <= 0:
            return Draft.root_only(root)
        if self.dynamic is not None:
            return self._dynamic(root, budget)
        return self._static_draft(root, budget)

    def _static_draft(self, root: int, budget: int) -> Draft:
        tree, ranks = self._static
        if tree.size > budget + 1:
            tree, ranks = tree_from_parents(tree.parents[: budget + 1]), ranks[: budget + 1]
        tokens = np.empty(tree.size, dtype=np.int64)
        tokens[0] = root
        width = int(ranks.max(initial=0)) + 1
        for depth in range(1, int(tree.depth.max()) + 1):
            nodes = np.flatnonzero(tree.depth == depth)
            parents = np.unique(tree.parents[nodes])
            top, _ = self._candidates(depth, tokens[parents], width)
            row = {p: i for i, p in enumerate(parents)}
            tokens[nodes] = [top[row[tree.parents[v]], ranks[v]] for v in nodes]
        return Draft(tokens, tree)

    def _dynamic(self, root: int, budget: int) -> Draft:
        grow = self.dynamic
        tokens, parents, scores = [root], [-1], [0.0]
        frontier = np.asarray([0])
        for depth in range(1, self.num_heads + 1):
            top, logp = self._candidates(depth, np.asarray(tokens)[frontier], grow.beam)
            first = len(tokens)
            for row, node in enumerate(frontier):
                for token, lp in zip(top[row], logp[row], strict=True):
                    tokens.append(int(token))
                    parents.append(int(node))
                    scores.append(scores[node] + float(lp))
            new = np.arange(first, len(tokens))
            frontier = new[np.argsort(-np.asarray(scores)[new], kind="stable")[: grow.beam]]
        return _best_subtree(tokens, parents, scores, min(grow.total, budget))


def _best_subtree(tokens: list[int], parents: list[int], scores: list[float],
                  keep: int) -> Draft:
    """The root and the ``keep`` best-scoring nodes, reindexed with parents first.

    Sorting by (score descending, creation order) keeps ancestors: a child's score is at
    most its parent's, and a parent is created before its children.
    """
    order = sorted(range(1, len(tokens)), key=lambda v: (-scores[v], v))[:keep]
    kept = [0, *sorted(order)]  # creation order is topological
    index = {v: i for i, v in enumerate(kept)}
    tree = tree_from_parents([-1, *(index[parents[v]] for v in kept[1:])])
    return Draft(np.asarray([tokens[v] for v in kept], dtype=np.int64), tree)
