"""Token recycling: reuse the candidates every verify step computed and then discarded.

Each verified position's logits rank the tokens that could follow its token; keeping the
top-k of them in a ``[V, k]`` successor table (overwritten by the newest observation)
gives, for any token, k plausible next tokens. A draft is a breadth-first walk of a
static tree template from the root: a node with rank r under a parent holding token t
drafts ``table[t, r]``. Rows never observed hold -1 and prune their subtree.
Deterministic candidates: lossless under rules 1 and 5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from leapc.ir.tree import tree_from_parents, tree_from_paths
from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.ranking import top_tokens

# Depth-major template of (rank per depth) paths: wide near the root, where acceptance
# is likeliest, narrowing with depth. 24 nodes + root.
DEFAULT_TEMPLATE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 0, 0),
)


@dataclass
class RecycleDrafter:
    vocab_size: int
    template: Sequence[Sequence[int]] = DEFAULT_TEMPLATE
    table: np.ndarray = field(init=False)

    def __post_init__(self):
        self._tree, self._ranks = tree_from_paths(self.template)
        self.k = int(self._ranks.max()) + 1
        self.table = np.full((self.vocab_size, self.k), -1, dtype=np.int64)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        tree, ranks = self._tree, self._ranks
        tokens = np.full(tree.size, -1, dtype=np.int64)
        tokens[0] = root
        keep = [0]
        new_index = {0: 0}
        parents = [-1]
        for node in range(1, tree.size):  # depth-major: parents are resolved first
            parent = int(tree.parents[node])
            if parent not in new_index or len(keep) > budget:
                continue
            token = self.table[tokens[parent], ranks[node]]
            if token < 0:
                continue
            tokens[node] = token
            new_index[node] = len(keep)
            keep.append(node)
            parents.append(new_index[parent])
        return Draft(tokens[keep], tree_from_parents(parents))

    def observe(self, context: list[int], result: Verification) -> None:
        self.table[result.draft.tokens] = top_tokens(result.logits, self.k)
