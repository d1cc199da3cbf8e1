"""Exact acceptance rules (DESIGN §7), one function per rule family.

Every rule returns the accepted path as node indices (root first) and the tokens the
step emits: the accepted drafted tokens followed by one token from the target (the
"bonus", or the correction at the first rejection).
"""

from __future__ import annotations

import numpy as np

from leapc.ir.tree import TreeBuffers
from leapc.runtime.drafters.base import ChildSampling, Draft
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


def _residual(r: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, r - q)): what is left of r after a rejected draw from q."""
    left = np.maximum(r - q, 0.0)
    total = left.sum()
    # total = 0 means r <= q everywhere, i.e. r == q: then no draw is ever rejected, so this
    # is reached only through rounding, where r itself is the exact answer.
    return left / total if total > 0 else r


def accept_tree_sampling(
    tokens: np.ndarray, tree: TreeBuffers, q: np.ndarray, logits: np.ndarray,
    cfg: SamplingConfig, rng: np.random.Generator, without_replacement: bool,
) -> tuple[list[int], list[int]]:
    """Rules 3 and 4 (multi-draft speculative sampling on a tree).

    At each visited node r := p. Its children, in the order they were drawn, each get one
    chance. Rule 3 (children i.i.d. from q): accept c with probability min(1, r(c)/q(c)),
    else r := norm(max(0, r - q)). Rule 4 (drawn without replacement, s := q): accept c if
    u * s(c) < r(c), else r := norm(max(0, r - s)), s(c) := 0, renormalise s. Either way
    the accepted token (or the draw from r once every child is rejected) is exactly
    p-distributed: each rejection removes from r precisely the mass the next draw could
    have claimed. ``q[c]`` is the draft distribution at c's parent.
    """
    path, emitted, node = [0], [], 0
    while True:
        r = probabilities(logits[node], cfg)
        children = _children(tree, node)
        s = q[children[0]].copy() if len(children) else None
        for child in children:
            x = int(tokens[child])
            if not without_replacement:
                s = q[child]
            if rng.random() * s[x] < r[x]:
                path.append(int(child))
                emitted.append(x)
                node = int(child)
                break
            r = _residual(r, s)
            if without_replacement:
                s[x] = 0.0
                s /= s.sum() or 1.0  # all of q's support drawn: no child is left to test
        else:
            emitted.append(int(rng.choice(len(r), p=r)))
            return path, emitted


def accept_typical(
    tokens: np.ndarray, tree: TreeBuffers, logits: np.ndarray, cfg: SamplingConfig,
    rng: np.random.Generator,
) -> tuple[list[int], list[int]]:
    """Rule 6 (lossy, opt-in): at each visited node follow the most probable child whose
    token passes p(x) > min(epsilon, delta * exp(-H(p))); where none passes, emit a draw
    from p. Emitted tokens are no longer exact draws from p: that is the trade it makes."""
    typical = cfg.typical
    path, emitted, node = [0], [], 0
    while True:
        p = probabilities(logits[node], cfg)
        entropy = -float(np.sum(p * np.log(np.where(p > 0, p, 1.0))))
        threshold = min(typical.epsilon, typical.delta * np.exp(-entropy))
        passing = [c for c in _children(tree, node) if p[tokens[c]] > threshold]
        if not passing:
            emitted.append(int(rng.choice(len(p), p=p)))
            return path, emitted
        node = int(max(passing, key=lambda c: p[tokens[c]]))
        path.append(node)
        emitted.append(int(tokens[node]))


def accept(draft: Draft, logits: np.ndarray, cfg: SamplingConfig,
           rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """The exact rule for this draft: deterministic candidates (or greedy) by rules 1/5,
    sampled chains by rule 2, sampled trees by rule 3 or 4; rule 6 when typical acceptance
    is asked for (sampling only: greedy decoding stays exact)."""
    if cfg.typical is not None and not cfg.greedy:
        return accept_typical(draft.tokens, draft.tree, logits, cfg, rng)
    if draft.q is None or cfg.greedy:
        return accept_deterministic(draft.tokens, draft.tree, logits, cfg, rng)
    if draft.tree.is_chain:
        return accept_chain_sampling(draft.tokens, draft.q, logits, cfg, rng)
    return accept_tree_sampling(draft.tokens, draft.tree, draft.q, logits, cfg, rng,
                                draft.children is ChildSampling.WITHOUT_REPLACEMENT)
