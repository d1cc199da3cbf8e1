"""Prompt lookup decoding: draft what followed the last time the context's tail occurred.

Code and edits repeat their context (identifiers, argument lists, whole lines), so the
longest suffix n-gram (n from ``max_ngram`` down to ``min_ngram``) that occurred earlier is
a cheap, often right, guess for what comes next. Deterministic candidates: exact under
greedy and under sampling (rule 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leapc.runtime.drafters.base import AdaptiveLength, Draft, Verification


def find_continuation(context: np.ndarray, max_ngram: int, min_ngram: int, length: int) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the longest suffix n-gram."""
    total = len(context)
    for n in range(min(max_ngram, total - 1), min_ngram - 1, -1):
        suffix = context[total - n :]
        windows = np.lib.stride_tricks.sliding_window_view(context[: total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = hits[-1] + n  # most recent occurrence: the freshest local pattern
            return context[start : start + length].tolist()
    return []


@dataclass
class LookupDrafter:
    max_ngram: int = 4
    min_ngram: int = 1
    max_draft: int = 8
    adaptive: bool = False  # the +2 / -1 draft-length heuristic
    length: AdaptiveLength = field(init=False)

    def __post_init__(self):
        self.length = AdaptiveLength(self.max_draft)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        ids = np.asarray([*context, root], dtype=np.int64)
        wanted = self.length.current if self.adaptive else self.max_draft
        drafted = find_continuation(ids, self.max_ngram, self.min_ngram, min(wanted, budget))
        return Draft.chain_of(root, drafted)

    def observe(self, context: list[int], result: Verification) -> None:
        self.length.update(result)
