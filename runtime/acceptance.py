"""Exact acceptance rules (DESIGN §7), one function per rule family.

Every rule returns the accepted path as node indices (root first) and the tokens the
step emits: the accepted drafted tokens followed by one token from the target (the
"bonus", or the correction at the first rejection).
"""

from __future__ import annotations

import numpy as np

from leapc.ir.tree import TreeBuffers
from leapc.runtime.sampling import SamplingConfig, probabilities, sample


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


def accept_chain_sampling(
    tokens: np.ndarray, q: np.ndarray, logits: np.ndarray, cfg: SamplingConfig,
    rng: np.random.Generator,
) -> tuple[list[int], list[int]]:
    """Rule 2 (speculative sampling on a chain): accept x_i with probability
    min(1, p(x_i) / q(x_i)); at the first rejection emit a draw from norm(max(0, p - q)),
    which makes the emitted token exactly p-distributed; if all are accepted, the bonus
    token is drawn from p at the last node. ``q[i]`` is the distribution x_i was drawn from.
    """
    path, emitted = [0], []
    for i in range(1, len(tokens)):
        p = probabilities(logits[i - 1], cfg)
        x = int(tokens[i])
        if rng.random() * q[i, x] < p[x]:  # u < p/q without dividing by a zero q
            path.append(i)
            emitted.append(x)
            continue
        residual = np.maximum(p - q[i], 0.0)
        emitted.append(int(rng.choice(len(p), p=residual / residual.sum())))
        return path, emitted
    emitted.append(sample(logits[len(tokens) - 1], cfg, rng))
    return path, emitted


def accept(tokens: np.ndarray, tree: TreeBuffers, q: np.ndarray | None, logits: np.ndarray,
           cfg: SamplingConfig, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """The exact rule for this draft: deterministic candidates (or greedy) by rules 1/5,
    sampled chains by rule 2."""
    if q is None or cfg.greedy:
        return accept_deterministic(tokens, tree, logits, cfg, rng)
    if tree.size != tree.depth[-1] + 1:
        raise NotImplementedError("sampled trees (rules 3 and 4) are not implemented yet")
    return accept_chain_sampling(tokens, q, logits, cfg, rng)
