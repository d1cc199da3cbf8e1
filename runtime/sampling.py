"""Turning logits into a next-token distribution and a token (numpy only).

The same `SamplingConfig` shapes both the target's ``p`` and any drafter's ``q`` so that
the exact acceptance rules of DESIGN §7 compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TypicalAcceptance:
    """Medusa's typical acceptance (DESIGN §7 rule 6), lossy by design: a drafted token x
    is accepted where p(x) > min(epsilon, delta * exp(-H(p))), i.e. where it is plausible
    enough under the target, judged against how uncertain the target is."""

    epsilon: float = 0.09  # Medusa's posterior_threshold
    delta: float = 0.3  # Medusa's posterior_alpha


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    typical: TypicalAcceptance | None = None  # opt-in lossy acceptance (sampling only)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Softmax of ``logits / T`` restricted to the top-k and then the top-p nucleus.

    Greedy (T = 0) is the limit: one-hot on the argmax, so verifiers can treat every
    policy as comparing distributions.
    """
    if cfg.greedy:
        one_hot = np.zeros(logits.shape)
        np.put_along_axis(one_hot, np.argmax(logits, axis=-1)[..., None], 1.0, axis=-1)
        return one_hot
    z = logits.astype(np.float64) / cfg.temperature
    if 0 < cfg.top_k < z.shape[-1]:
        kth = np.partition(z, -cfg.top_k, axis=-1)[..., -cfg.top_k, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= cfg.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    if cfg.greedy:
        return int(np.argmax(logits))
    p = probabilities(logits, cfg)
    return int(rng.choice(p.shape[-1], p=p))


def sample_distinct(p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct tokens drawn from ``p`` without replacement, in draw order.

    Gumbel-top-k: the indices of the k largest ``log p + Gumbel`` keys are distributed as
    k successive draws without replacement (each from p renormalised over what is left).
    """
    k = min(k, int(np.count_nonzero(p)))
    with np.errstate(divide="ignore"):
        keys = np.log(p) + rng.gumbel(size=p.shape)
    return np.argsort(-keys, kind="stable")[:k]
