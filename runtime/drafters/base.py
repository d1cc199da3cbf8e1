"""The drafter protocol: propose a token tree, then observe what verification accepted."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

import numpy as np

from leapc.ir.tree import TreeBuffers, chain
from leapc.runtime.kv_cache import KVCache


class ChildSampling(Enum):
    """How a sampling drafter drew the children of one node (which exact rule applies)."""

    IID = "iid"  # independent draws from q: rule 3
    WITHOUT_REPLACEMENT = "without-replacement"  # Gumbel-top-k, distinct tokens: rule 4


@dataclass(frozen=True, eq=False)
class ExtraNodes:
    """Step nodes after the token tree that are computed but never accepted or committed.

    A drafter that wants the target's logits at tokens of its own (lookahead decoding's
    Jacobi window) appends them to its draft. ``offsets`` are positions relative to the
    root, as tree depths are; row i of ``mask`` says which of the step's nodes (the tree's
    first, then these) node i attends to, besides the committed past. Tree nodes never
    attend to extra nodes, so the tree's logits are those of a step without them.
    """

    tokens: np.ndarray  # [E] int64
    offsets: np.ndarray  # [E] int64: position minus the root's position
    mask: np.ndarray  # [E, tree size + E] bool

    @property
    def size(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True, eq=False)
class Draft:
    """A token tree rooted at the last emitted (not yet verified) token.

    ``tokens[0]`` is that root; ``tree`` gives every node's parent and depth. ``q`` holds,
    for drafters that sample, the distribution each node's token was drawn from
    (``[n, V]``: the draft distribution at the node's parent; row 0 unused); ``None``
    means deterministic candidates (rule 5). ``children`` says how siblings were drawn.
    ``extra`` holds nodes that ride along in the same step after the tree (see
    `ExtraNodes`); acceptance and the KV cache only ever see the tree.
    """

    tokens: np.ndarray
    tree: TreeBuffers
    q: np.ndarray | None = None
    children: ChildSampling = ChildSampling.WITHOUT_REPLACEMENT
    extra: ExtraNodes | None = None

    def __post_init__(self):
        if self.extra is not None and self.extra.mask.shape != (self.extra.size, self.step_size):
            raise ValueError(f"extra nodes' mask is {self.extra.mask.shape}; a step of "
                             f"{self.step_size} nodes needs ({self.extra.size}, {self.step_size})")

    @property
    def step_size(self) -> int:
        """Nodes the verify step runs: the tree's, then the extra ones."""
        return self.tree.size + (self.extra.size if self.extra is not None else 0)

    def step_nodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The step's tokens, positions relative to the root, and ``[n, n]`` node mask."""
        tree = self.tree
        if self.extra is None:
            return self.tokens, tree.depth, tree.ancestor_mask
        extra = self.extra
        tree_rows = np.zeros((tree.size, self.step_size), dtype=bool)
        tree_rows[:, : tree.size] = tree.ancestor_mask
        return (np.concatenate([self.tokens, extra.tokens]),
                np.concatenate([tree.depth, extra.offsets]),
                np.concatenate([tree_rows, extra.mask]))

    @classmethod
    def root_only(cls, root: int) -> Draft:
        return cls(np.asarray([root], dtype=np.int64), chain(0))

    @classmethod
    def chain_of(cls, root: int, drafted: list[int]) -> Draft:
        return cls(np.asarray([root, *drafted], dtype=np.int64), chain(len(drafted)))


@dataclass(frozen=True, eq=False)
class Verification:
    """What one verify step found: the target's logits at every node of the draft's tree,
    the accepted path (node indices, root first), the emitted tokens (path + bonus), and
    the logits at the draft's extra nodes, if it had any, and the step's other outputs
    as the program returned them (batch axis and every step row included: ``hidden``,
    ``head_logits`` of engines with decoding heads).

    ``logits`` stays row-aligned with ``draft.tokens``, so code that reads the tree's
    logits cannot mistake an extra node's row for a tree node's.
    """

    draft: Draft
    logits: np.ndarray  # [tree size, V]
    path: list[int]
    emitted: list[int]
    extra_logits: np.ndarray | None = None  # [E, V] when draft.extra is not None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


class Drafter(Protocol):
    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        """Draft after ``context + [root]``: at most ``budget`` nodes besides the root,
        tree and extra nodes together. The loop sizes ``budget`` (`decode.draft_budget`)
        so that such a step, and one cache slot after it, fit max_seq and the programs'
        N bound; drafting that costs more (a scoring window, a catch-up) fits on its own."""
        ...

    def observe(self, context: list[int], result: Verification) -> None:
        """Learn from a verify step; ``context`` already includes its committed tokens."""
        ...


@runtime_checkable
class ReadsPrefill(Protocol):
    """A drafter that drafts from the target's outputs (decoding heads) also reads the last
    prefill call's, so the first decode step is drafted too."""

    def observe_prefill(self, outputs: dict[str, np.ndarray]) -> None:
        """``outputs``: the last prefill call's, batch axis and rows included; its last row
        is the last prompt token's."""
        ...


@runtime_checkable
class VerifiesDraft(Protocol):
    """A drafter whose drafts are verified by programs of its own rather than the step
    program (early exit: the remainder after the exit, over the draft's hidden states)."""

    def verify(self, cache: KVCache, draft: Draft) -> dict[str, np.ndarray]:
        """The step's outputs for ``draft``: ``logits`` at every node and ``present``
        (every layer's rows, committed by the loop like the step program's)."""
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
