"""Exact acceptance rules (DESIGN §7), one function per rule family.

Every rule returns the accepted path as node indices (root first) and the tokens the
step emits: the accepted drafted tokens followed by one token from the target (the
"bonus", or the correction at the first rejection).
"""

from __future__ import annotations

import numpy as np

from leapc.ir.tree import TreeBuffers
from leapc.runtime.sampling import SamplingConfig, sample


def _children(tree: TreeBuffers, node: int) -> np.ndarray:
    return np.flatnonzero(tree.parents == node)


def accept_deterministic(
    tokens: np.ndarray, tree: TreeBuffers, logits: np.ndarray, cfg: SamplingConfig,
    rng: np.random.Generator,
) -> tuple[list[int], list[int]]:
    """Rules 1 and 5: draw y from the target once per visited node, follow the child equal
    to y. Greedy (y = argmax) reproduces plain greedy decoding; under sampling each emitted
    token is an exact draw from p because candidates are fixed before y is drawn.
    """
    path, emitted, node = [0], [], 0
    while True:
        y = sample(logits[node], cfg, rng)
        emitted.append(y)
        match = [c for c in _children(tree, node) if tokens[c] == y]
        if not match:
            return path, emitted
        node = int(match[0])
        path.append(node)
