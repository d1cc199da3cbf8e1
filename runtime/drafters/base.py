"""The drafter protocol: propose a token tree, then observe what verification accepted."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from leapc.ir.tree import TreeBuffers, chain


class ChildSampling(Enum):
    """How a sampling drafter drew the children of one node (which exact rule applies)."""

    IID = "iid"  # independent draws from q: rule 3
    WITHOUT_REPLACEMENT = "without-replacement"  # Gumbel-top-k, distinct tokens: rule 4


@dataclass(frozen=True, eq=False)
class Draft:
    """A token tree rooted at the last emitted (not yet verified) token.

    ``tokens[0]`` is that root; ``tree`` gives every node's parent and depth. ``q`` holds,
    for drafters that sample, the distribution each node's token was drawn from
    (``[n, V]``: the draft distribution at the node's parent; row 0 unused); ``None``
    means deterministic candidates (rule 5). ``children`` says how siblings were drawn.
    """

    tokens: np.ndarray
    tree: TreeBuffers
    q: np.ndarray | None = None
    children: ChildSampling = ChildSampling.WITHOUT_REPLACEMENT

    @classmethod
    def root_only(cls, root: int) -> Draft:
        return cls(np.asarray([root], dtype=np.int64), chain(0))

    @classmethod
    def chain_of(cls, root: int, drafted: list[int]) -> Draft:
        return cls(np.asarray([root, *drafted], dtype=np.int64), chain(len(drafted)))


@dataclass(frozen=True, eq=False)
class Verification:
    """What one verify step found: the target's logits at every node of the draft, the
    accepted path (node indices, root first) and the emitted tokens (path + bonus)."""

    draft: Draft
    logits: np.ndarray  # [n, V]
    path: list[int]
    emitted: list[int]


class Drafter(Protocol):
    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        """Draft at most ``budget`` tokens after ``context + [root]``."""
        ...

    def observe(self, context: list[int], result: Verification) -> None:
        """Learn from a verify step; ``context`` already includes its committed tokens."""
        ...


@dataclass
class AdaptiveLength:
    """Draft depth by the +2 / -1 heuristic: after a draft accepted to its full depth, try
    two more next time; after a rejection, one fewer (at least one)."""

    maximum: int
    current: int = 0

    def __post_init__(self):
        self.current = self.current or self.maximum

    def update(self, result: Verification) -> None:
        drafted, accepted = int(result.draft.tree.depth.max()), len(result.path) - 1
        if drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.maximum, self.current + 2)
        else:
            self.current = max(1, self.current - 1)


class NoDrafter:
    """Autoregressive decoding: verify the root alone."""

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        return Draft.root_only(root)

    def observe(self, context: list[int], result: Verification) -> None:
        pass
