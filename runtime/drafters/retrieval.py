"""Retrieval drafting (REST, He et al., NAACL 2024), with prompt lookup merged in.

A small model trained on a corpus keeps writing what that corpus says after the last few
tokens: the same idioms, call patterns and docstring phrases. The datastore (the corpus
and its suffix array, `leapc.runtime.datastore`) finds every occurrence of the context's
last n-gram and counts what followed; the most frequent continuation prefixes form a
token tree. The context's own earlier occurrences (prompt lookup) catch what the corpus
cannot: names and lines local to this request. Both go into one tree, the context's
continuation first, and one step verifies it.

Deterministic candidates: lossless under rules 1 and 5. Nothing carries over between
requests: the datastore is read-only, so a benchmark's repeats cannot learn the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leapc.ir.errors import InputError
from leapc.runtime.datastore import Datastore
from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.lookup import find_continuations, trie

# Prompt lookup's continuation at depth d is taken to be accepted with probability
# CONTEXT_ACCEPTANCE ** d: a match in this very request is usually right, and this ranks
# it above all but the surest corpus paths (measured, docs/decisions.md).
CONTEXT_ACCEPTANCE = 0.9


@dataclass(frozen=True)
class RetrievalConfig:
    # Defaults: the fastest measured on the bundled model (docs/decisions.md). Every step
    # token costs on a CPU, so only likely nodes go in.
    nodes: int = 10  # at most this many draft nodes per step
    min_probability: float = 0.3  # leave out nodes whose estimated acceptance is lower
    max_ngram: int = 4  # longest context suffix looked up in the corpus
    min_occurrences: int = 20  # back off to a shorter suffix seen at least this often
    length: int = 6  # deepest corpus continuation
    samples: int = 512  # occurrences counted per lookup

    def __post_init__(self):
        if min(self.nodes, self.max_ngram, self.min_occurrences, self.length, self.samples) < 1:
            raise InputError(f"retrieval settings must all be >= 1 (got {self})")
        if not 0.0 <= self.min_probability < 1.0:
            raise InputError(f"retrieval min-probability must be in [0, 1) "
                             f"(got {self.min_probability})")


@dataclass
class RetrievalDrafter:
    datastore: Datastore
    config: RetrievalConfig = RetrievalConfig()
    max_draft: int = 8  # the context continuation's length (prompt lookup)
    max_ngram: int = 4  # prompt lookup: longest context n-gram matched

    def __post_init__(self):
        if self.config.max_ngram + self.config.length > self.datastore.depth:
            raise InputError(f"retrieval n-gram {self.config.max_ngram} + length "
                             f"{self.config.length} exceeds the datastore's sorted depth "
                             f"{self.datastore.depth}")

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        ids = np.asarray([*context, root], dtype=np.int64)
        cfg = self.config
        nodes = min(cfg.nodes, budget)
        candidates = self._context_candidates(ids, nodes) + self._corpus_candidates(ids, nodes)
        return trie(root, [list(path) for path in _likeliest(candidates, cfg.min_probability,
                                                             nodes)], nodes)

    def _context_candidates(self, ids: np.ndarray, nodes: int) -> list[tuple[float, tuple]]:
        """The prompt-lookup continuation; depth d estimated at ``CONTEXT_ACCEPTANCE ** d``."""
        found = find_continuations(ids, self.max_ngram, 1, min(self.max_draft, nodes))
        return [(CONTEXT_ACCEPTANCE ** d, tuple(found[0][:d]))
                for d in range(1, len(found[0]) + 1)] if found else []

    def _corpus_candidates(self, ids: np.ndarray, nodes: int) -> list[tuple[float, tuple]]:
        """Corpus paths; a path's estimate is the share of occurrences it continues."""
        cfg = self.config
        found = self.datastore.continuations(ids, cfg.max_ngram, cfg.length, nodes,
                                             cfg.min_occurrences, cfg.samples)
        counted = min(found.occurrences, cfg.samples)
        return [(count / counted, path) for path, count in zip(found.paths, found.counts,
                                                               strict=True)]

    def observe(self, context: list[int], result: Verification) -> None:
        pass


def _likeliest(candidates: list[tuple[float, tuple]], min_probability: float,
               nodes: int) -> list[tuple]:
    """The most likely paths (at least ``min_probability``), at most ``nodes``, each with
    its parent: every estimate falls with depth, so parents sort first."""
    kept: list[tuple] = []
    for probability, path in sorted(candidates, key=lambda c: (-c[0], len(c[1]))):
        if probability < min_probability or len(kept) == nodes:
            break
        if path not in kept and (len(path) == 1 or path[:-1] in kept):
            kept.append(path)
    return kept
