"""Prompt lookup decoding: draft what followed the last time the context's tail occurred.

Code and edits repeat their context (identifiers, argument lists, whole lines), so the
longest suffix n-gram (n from ``max_ngram`` down to ``min_ngram``) that occurred earlier is
a cheap, often right, guess for what comes next. With ``matches > 1`` the continuations of
several earlier occurrences are verified together as a tree (one call; shared prefixes
once). Deterministic candidates: exact under greedy and under sampling (rule 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leapc.ir.tree import tree_from_paths
from leapc.runtime.drafters.base import AdaptiveLength, Draft, Verification


def find_continuations(context: np.ndarray, max_ngram: int, min_ngram: int, length: int,
                       matches: int = 1) -> list[list[int]]:
    """What followed the longest suffix n-gram's earlier occurrences: up to ``matches``
    distinct continuations, most recent occurrence (the freshest local pattern) first."""
    total = len(context)
    for n in range(min(max_ngram, total - 1), min_ngram - 1, -1):
        suffix = context[total - n :]
        windows = np.lib.stride_tricks.sliding_window_view(context[: total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        found: list[list[int]] = []
        for start in hits[::-1] + n:
            continuation = context[start : start + length].tolist()
            if continuation not in found:
                found.append(continuation)
            if len(found) == matches:
                break
        if found:
            return found
    return []


def trie(root: int, continuations: list[list[int]], budget: int) -> Draft:
    """The continuations merged on common prefixes, as many as fit in ``budget`` nodes
    (in order; the one that overflows is cut short)."""
    paths: set[tuple[int, ...]] = set()
    for continuation in continuations:
        for k in range(1, len(continuation) + 1):
            if len(paths) == budget:
                break
            paths.add(tuple(continuation[:k]))
    tree, last_tokens = tree_from_paths(sorted(paths))
    tokens = last_tokens.copy()
    tokens[0] = root
    return Draft(tokens, tree)


@dataclass
class LookupDrafter:
    max_ngram: int = 4
    min_ngram: int = 1
    max_draft: int = 8
    adaptive: bool = False  # the +2 / -1 draft-length heuristic
    matches: int = 1  # continuations of distinct earlier occurrences, merged into a tree
    length: AdaptiveLength = field(init=False)

    def __post_init__(self):
        self.length = AdaptiveLength(self.max_draft)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        ids = np.asarray([*context, root], dtype=np.int64)
        wanted = self.length.current if self.adaptive else self.max_draft
        found = find_continuations(ids, self.max_ngram, self.min_ngram, min(wanted, budget),
                                   self.matches)
        return trie(root, found, budget)

    def observe(self, context: list[int], result: Verification) -> None:
        self.length.update(result)
