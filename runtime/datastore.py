"""A token datastore for retrieval drafting (REST, He et al., NAACL 2024).

A corpus is stored as one token stream (documents separated by ``SEPARATOR``) and its
suffix array truncated to ``depth`` tokens: suffix start positions sorted by their first
``depth`` tokens. Every occurrence of an n-gram (n <= depth) is then one contiguous range
of the array, found by two binary searches per token, and within that range the
continuations are sorted too, so counting how often each continuation prefix follows
the n-gram is a run-length count over a small token matrix, with no hashing.

Runtime code needs only numpy: building sorts the stream once (``np.lexsort`` over
``depth`` shifted views), loading memory-maps two ``.npy`` files.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from leapc.ir.errors import EngineError

SEPARATOR = -1  # between documents and past the end: sorts first, never a real token
TOKENS_FILE, SUFFIXES_FILE = "tokens.npy", "suffixes.npy"


@dataclass(frozen=True)
class Continuations:
    """The most frequent continuation prefixes of a matched n-gram, most frequent first.

    ``paths[i]`` is a token path below the match and ``counts[i]`` how many sampled
    occurrences continue with it. The list is prefix-closed: a path's parent (one token
    shorter) is at least as frequent and comes earlier.
    """

    ngram: int  # length of the context suffix that matched (0: none did)
    occurrences: int  # how often it occurs in the corpus
    paths: list[tuple[int, ...]]
    counts: list[int]


@dataclass(frozen=True, eq=False)
class Datastore:
    tokens: np.ndarray  # [L + depth] int32 corpus stream, SEPARATOR-padded at the end
    suffixes: np.ndarray  # [L] int32 start positions, sorted on their first `depth` tokens
    depth: int

    @classmethod
    def build(cls, documents: list[list[int]], depth: int = 12) -> Datastore:
        stream = [t for doc in documents for t in (*doc, SEPARATOR)]
        length = len(stream)
        tokens = np.asarray(stream + [SEPARATOR] * depth, dtype=np.int32)
        # lexsort sorts by its last key first: the suffix's first token is the primary key.
        keys = [tokens[d : d + length] for d in range(depth - 1, -1, -1)]
        return cls(tokens, np.lexsort(keys).astype(np.int32), depth)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / TOKENS_FILE, self.tokens)
        np.save(directory / SUFFIXES_FILE, self.suffixes)

    @classmethod
    def load(cls, directory: Path, depth: int) -> Datastore:
        try:
            tokens = np.load(directory / TOKENS_FILE)  # in memory: a memmap's item reads are slow
            suffixes = np.load(directory / SUFFIXES_FILE)
        except (OSError, ValueError) as err:
            raise EngineError(f"{directory}: datastore cannot be loaded ({err})") from None
        if len(tokens) != len(suffixes) + depth:
            raise EngineError(f"{directory}: datastore files disagree on the corpus length")
        return cls(tokens, suffixes, depth)

    @property
    def size(self) -> int:
        return len(self.suffixes)

    @cached_property
    def _first_token_starts(self) -> np.ndarray:
        """Where each first token's range begins (token t: ``[starts[t], starts[t + 1])``):
        the suffixes are sorted on it, so the ranges follow the token counts."""
        counts = np.bincount(self.tokens[: self.size] + 1)  # separators (-1) sort first
        return np.concatenate([[0], np.cumsum(counts)])[1:]

    def _narrow(self, lo: int, hi: int, offset: int, token: int) -> tuple[int, int]:
        """The sub-range of suffixes[lo:hi] (equal up to ``offset``) whose next token is
        ``token``."""
        if hi - lo <= 64:  # one small gather beats two Python binary searches
            column = self.tokens[self.suffixes[lo:hi] + offset]
            return (lo + int(np.searchsorted(column, token, "left")),
                    lo + int(np.searchsorted(column, token, "right")))
        tokens, suffixes = self.tokens, self.suffixes

        def key(i: int) -> int:
            return tokens[suffixes[i] + offset]

        return (bisect.bisect_left(range(lo, hi), token, key=key) + lo,
                bisect.bisect_right(range(lo, hi), token, key=key) + lo)

    def occurrences(self, ngram: np.ndarray) -> tuple[int, int]:
        """The range of ``suffixes`` that starts with ``ngram`` (empty: ``lo == hi``)."""
        if len(ngram) > self.depth:
            raise ValueError(f"n-gram of {len(ngram)} tokens; the datastore sorts {self.depth}")
        first = int(ngram[0])
        starts = self._first_token_starts
        if not 0 <= first < len(starts) - 1:
            return 0, 0
        lo, hi = int(starts[first]), int(starts[first + 1])
        for offset, token in enumerate(ngram[1:].tolist(), 1):
            if lo == hi:
                break
            lo, hi = self._narrow(lo, hi, offset, token)
        return lo, hi

    def continuations(self, context: np.ndarray, max_ngram: int, length: int, nodes: int,
                      min_occurrences: int = 1, samples: int = 512) -> Continuations:
        """The ``nodes`` most frequent continuation prefixes (up to ``length`` tokens) of a
        context suffix: the longest (at most ``max_ngram`` tokens) that occurs at least
        ``min_occurrences`` times, else the longest that occurs at all. A long match seen
        twice is a worse guide than a shorter one seen often: the model generalises, it
        does not recite one file. Counted over at most ``samples`` occurrences, evenly
        spaced in the range (so still sorted)."""
        found = None
        for n in range(min(max_ngram, len(context), self.depth - length), 0, -1):
            lo, hi = self.occurrences(context[len(context) - n :])
            if hi > lo and found is None:
                found = n, lo, hi
            if hi - lo >= min_occurrences:
                found = n, lo, hi
                break
        if found is None:
            return Continuations(0, 0, [], [])
        n, lo, hi = found
        count = min(samples, hi - lo)
        rows = self.suffixes[lo + np.arange(count) * (hi - lo) // count] + n
        window = self.tokens[rows[:, None] + np.arange(length)]
        return Continuations(n, hi - lo, *_frequent_prefixes(window, nodes))


def _frequent_prefixes(window: np.ndarray, nodes: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """Run-length count of every prefix of the lexicographically sorted rows of
    ``window``; the ``nodes`` most frequent (ties: shallower first), separator-free.

    A run of equal depth-(d+1) prefixes starts at row r when row r differs from row r-1 in
    any of its first d+1 tokens; its count is the distance to the next run's start.
    """
    rows, length = window.shape
    starts = np.ones((length, rows), dtype=bool)  # [depth, row], depth-major for flatnonzero
    starts[:, 1:] = np.logical_or.accumulate(window[1:] != window[:-1], axis=1).T
    flat = np.flatnonzero(starts)
    depth, row = np.divmod(flat, rows)
    counts = np.minimum(np.append(flat[1:], starts.size), (depth + 1) * rows) - flat
    dead = np.logical_or.accumulate(window == SEPARATOR, axis=1)  # paths end with their document
    live = ~dead[row, depth]
    depth, row, counts = depth[live], row[live], counts[live]
    best = np.lexsort((depth, -counts))[:nodes]
    paths = [tuple(window[row[i], : depth[i] + 1].tolist()) for i in best]
    return paths, counts[best].tolist()
