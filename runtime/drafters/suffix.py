"""SuffixDecoding (Oliaro et al., 2024): draft from a suffix trie of the generation so far.

Agentic and code workloads repeat themselves: a tool call, a loop body, a line edited
and written again. A suffix trie of every token sequence seen (here: this generation's
prompt and output) knows, for the context's tail, every continuation it has had and how
often. The longest suffix of the context found in the trie anchors the draft; from it, a
best-first search by empirical path probability (the product along the path of
count(child) / count(parent)) keeps the likeliest continuations as a token tree, at most
``ceil(alpha * match length)`` nodes: a long match is trusted with a big tree, a short one
with a guess or two.

The trie is bounded in depth: each position's next ``depth`` tokens are inserted, and a
node counts how often its path occurred. A new token extends the paths still open (the
suffixes shorter than ``depth``), so an update costs O(depth). count(parent) counts only
the parent's occurrences that a known token followed (the sum of its children's counts):
an occurrence at the very end of the sequence has no continuation yet.

Deterministic candidates: lossless under greedy and under sampling (rules 1 and 5).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from leapc.ir.errors import InputError
from leapc.ir.tree import tree_from_paths
from leapc.runtime.drafters.base import Draft, Verification

if TYPE_CHECKING:
    from leapc.runtime.policies import DraftContext

# Longest context suffix matched (SuffixDecoding's pattern length). The trie is this plus
# the draft's depth cap deep, so a match of any length leaves room to draft to the cap; an
# update costs O(that depth) per token.
MAX_MATCH = 24
# SuffixDecoding's adaptive tree size: at most ceil(ALPHA * match length) nodes, so a short
# (unreliable) match drafts little. On stories260K and the bundled model (5 and 7 prompts,
# 128 tokens) alpha 1 / 2 / 4 took 0.784 / 0.748 / 0.738 and 0.355 / 0.340 / 0.334 steps per
# token for 0.8 / 1.2 / 2.0 and 2.4 / 2.8 / 3.5 drafted nodes per step: 2 is most of the gain
# for few extra step tokens (each costs on a CPU).
ALPHA = 2.0
# Nodes whose empirical path probability is below this are not drafted: each costs a
# verify-step token and is rarely accepted. (0.05 and 0.2 took the same steps on
# stories260K: the ALPHA limit binds first.)
MIN_PROBABILITY = 0.1


# Child lookups key one flat dict by ``parent << TOKEN_BITS | token``: token ids are below
# 2**32 in every vocabulary, and ints keep the trie free of per-node objects (with a
# dict and an object per node, Python's cycle collector scanning the growing trie made an
# update over three times slower).
TOKEN_BITS = 32


class SuffixTrie:
    """Every substring of the tokens appended so far, up to ``depth`` tokens long, counted.

    Nodes are integers (the root is 0); a node's path is the sequence of tokens on the
    edges from the root to it. Per node: ``count``, the path's occurrences; ``continued``,
    those a known token followed (the sum of its children's counts); ``last``, the index
    of the last token of the path's latest occurrence.
    """

    ROOT = 0

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"a suffix trie needs depth >= 1 (got {depth})")
        self.depth = depth
        self.length = 0  # tokens appended
        self.count, self.continued, self.last = [0], [0], [-1]
        self._edges: dict[int, int] = {}  # parent << TOKEN_BITS | token -> child
        self._token = [-1]  # the token on the edge into each node
        self._first_child, self._next_sibling = [-1], [-1]  # each node's children, a list
        # The nodes of the sequence's suffixes shorter than ``depth``, longest first: the
        # paths a new token extends (and the root, to the one-token suffix).
        self._open: list[int] = []

    @property
    def size(self) -> int:
        return len(self.count)

    def children(self, node: int) -> dict[int, int]:
        """``node``'s children by token."""
        found, child = {}, self._first_child[node]
        while child != -1:
            found[self._token[child]] = child
            child = self._next_sibling[child]
        return found

    def append(self, token: int) -> None:
        edges, count, continued, last = self._edges, self.count, self.continued, self.last
        first_child, position, extended = self._first_child, self.length, []
        for node in (*self._open, self.ROOT):
            key = node << TOKEN_BITS | token
            child = edges.get(key)
            if child is None:  # a new path: its node heads ``node``'s list of children
                child = edges[key] = len(count)
                count.append(1)
                continued.append(0)
                last.append(position)
                self._token.append(token)
                self._next_sibling.append(first_child[node])
                first_child.append(-1)
                first_child[node] = child
            else:
                count[child] += 1
                last[child] = position
            continued[node] += 1
            extended.append(child)
        count[self.ROOT] += 1
        self.length += 1
        # the longest reached ``depth`` tokens: no position's path goes deeper
        self._open = extended[1:] if len(extended) == self.depth else extended

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.append(token)

    def match(self, token: int, longest: int) -> tuple[int, int] | None:
        """The node of the longest suffix of the tokens + ``[token]``, at most ``longest``
        tokens, that a known token followed somewhere, and its length; None if none did."""
        suffixes = (*self._open, self.ROOT)  # lengths len(_open) .. 0
        for i, node in enumerate(suffixes):
            length = len(suffixes) - i  # with ``token``
            if length > longest:
                continue
            found = self._edges.get(node << TOKEN_BITS | token)
            if found is not None and self.continued[found]:
                return found, length
        return None


def speculate(trie: SuffixTrie, start: int, limit: int, depth: int, min_probability: float,
              ) -> list[tuple[tuple[int, ...], int, float]]:
    """The likeliest continuations of ``start``'s path: at most ``limit`` nodes, at most
    ``depth`` deep, none below ``min_probability``, found best first. Each is (its rank
    path: the rank of every node among its drafted siblings, likeliest 0; its token; its
    probability), in the order found, so every node follows its parent."""
    count, continued, last = trie.count, trie.continued, trie.last
    frontier: list[tuple[float, int, int, tuple[int, ...], int]] = []

    def push(parent: int, probability: float, ranks: tuple[int, ...]) -> None:
        for token, child in trie.children(parent).items():
            p = probability * count[child] / continued[parent]
            if p >= min_probability:  # equal probabilities: the most recent occurrence first
                heapq.heappush(frontier, (-p, -last[child], child, ranks, token))

    kept: list[tuple[tuple[int, ...], int, float]] = []
    if limit < 1 or depth < 1:
        return kept
    drafted_children: dict[tuple[int, ...], int] = {(): 0}  # per kept node, by rank path
    push(start, 1.0, ())
    while frontier and len(kept) < limit:
        negative, _, node, parent_ranks, token = heapq.heappop(frontier)
        ranks = (*parent_ranks, drafted_children[parent_ranks])
        drafted_children[parent_ranks] += 1
        drafted_children[ranks] = 0
        kept.append((ranks, token, -negative))
        if len(ranks) < depth and continued[node]:
            push(node, -negative, ranks)
    return kept


@dataclass
class SuffixDrafter:
    """Drafts the likeliest continuations of the context's longest matched suffix; the
    trie covers the committed context (the prompt, then every step's accepted tokens)."""

    max_draft: int = 8  # deepest drafted node
    alpha: float = ALPHA  # at most ceil(alpha * match length) nodes
    min_probability: float = MIN_PROBABILITY  # lowest path probability drafted
    max_match: int = MAX_MATCH  # longest suffix matched
    trie: SuffixTrie = field(init=False)

    def __post_init__(self):
        if self.max_draft < 0 or self.max_match < 1 or self.alpha <= 0:
            raise InputError(f"suffix drafting needs max-draft >= 0, max_match >= 1, alpha > 0 "
                             f"(got {self.max_draft}, {self.max_match}, {self.alpha})")
        if not 0.0 <= self.min_probability <= 1.0:
            raise InputError(f"suffix min_probability must be in [0, 1] "
                             f"(got {self.min_probability})")
        self.trie = SuffixTrie(self.max_match + self.max_draft)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        self._catch_up(context)
        found = self.trie.match(root, self.max_match)
        if found is None:
            return Draft.root_only(root)
        node, length = found
        limit = min(budget, math.ceil(self.alpha * length))
        kept = speculate(self.trie, node, limit, self.max_draft, self.min_probability)
        if not kept:
            return Draft.root_only(root)
        tree, _ = tree_from_paths([ranks for ranks, _, _ in kept])
        # tree_from_paths orders nodes by depth, then rank path
        tokens = [root] + [token for _, token, _ in sorted(kept, key=lambda k: (len(k[0]), k[0]))]
        return Draft(np.asarray(tokens, dtype=np.int64), tree)

    def observe(self, context: list[int], result: Verification) -> None:
        self._catch_up(context)

    def _catch_up(self, context: list[int]) -> None:
        """Append the context's tokens the trie has not seen (all of the prompt at first;
        then each step's committed ones)."""
        if len(context) < self.trie.length:  # another sequence: start over
            self.trie = SuffixTrie(self.trie.depth)
        self.trie.extend(context[self.trie.length :])


def suffix_drafter(c: DraftContext) -> SuffixDrafter:
    """The `suffix` policy's factory: drafts at most ``--max-draft`` deep."""
    return SuffixDrafter(max_draft=c.options.draft_length())
