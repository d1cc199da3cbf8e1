"""Draft-model speculation: a small model with the same vocabulary drafts a chain or a tree.

The draft model runs in its own step program with its own KV cache. Before drafting it
catches up on the tokens the target committed since its last call (one chunked call),
then grows the draft one depth per call: every node of the newest depth is evaluated in
one call. Children are the top tokens of the draft (greedy) or draws from q, the draft's
distribution after the target's temperature / top-k / top-p — the q rules 2–4 need —
i.i.d. or without replacement.

The cache stays prefix-valid, the form the target's tree-attention lowerings (and leapc's
attention kernel) take, so the draft model is lowered as the target is. A call feeds the
newest depth's nodes together with their ancestors that have no rows in the cache, as a
token tree over the whole cache. While the tree is a chain (one node at the newest depth)
every later node descends from the fed nodes, so their rows stay after the context as
*scratch*; once it branches, siblings must not see each other, so the nodes below the
scratch are fed again at the next depth (a few rows through a small model). After
verification the scratch rows on the accepted path are kept, followed by the accepted
nodes' rows from the last call, and the rest dropped.

A greedy chain (no branching, no confidence stop) is one call when the engine has the
chain unrolled (`UnrolledChain`, `passes/unroll_draft_chain.py`): the catch-up and every
depth in one program call, its rows committed the same way (catch-up, then the scratch
rows of the drafted tokens it fed). Steps near the end of the context, where the
unrolled chain's rows would not fit, grow one depth per call as above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leapc.ir.tree import chain, tree_from_parents
from leapc.runtime.decode import prefill, refeed_inputs
from leapc.runtime.drafters.base import AdaptiveLength, ChildSampling, Draft, Verification
from leapc.runtime.drafters.ranking import top_tokens
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.sampling import SamplingConfig, probabilities, sample_distinct
from leapc.runtime.step import DRAFTED, StepFunction


@dataclass(frozen=True)
class TreeShape:
    """``branching[d]`` children per node at depth d + 1; deeper depths grow a chain.
    ``confidence``: a node whose draft top-1 probability is below it is not expanded."""

    max_depth: int = 4
    branching: tuple[int, ...] = ()
    confidence: float = 0.0
    children: ChildSampling = ChildSampling.WITHOUT_REPLACEMENT

    def width(self, depth: int) -> int:
        return self.branching[depth - 1] if depth <= len(self.branching) else 1


@dataclass
class _Growing:
    """The draft tree under construction."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    q: list[np.ndarray | None] = field(default_factory=lambda: [None])
    ancestors: list[list[int]] = field(default_factory=lambda: [[]])  # non-root ancestors
    # Nodes whose rows follow the context in the cache, depth 1 first: a chain that every
    # later node descends from.
    scratch: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=lambda: [0])

    def add(self, token: int, parent: int, q: np.ndarray | None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.q.append(q)
        self.ancestors.append(self.ancestors[parent] + ([parent] if parent else []))
        self.depth.append(self.depth[parent] + 1)
        return len(self.tokens) - 1

    def draft(self, children: ChildSampling) -> Draft:
        q = None if self.q[-1] is None else np.stack([np.zeros_like(self.q[-1]), *self.q[1:]])
        n = len(self.parents)
        is_chain = self.parents == [-1, *range(n - 1)]  # the shared buffers, not a rebuild
        tree = chain(n - 1) if is_chain else tree_from_parents(np.asarray(self.parents))
        return Draft(np.asarray(self.tokens, dtype=np.int64), tree, q, children)


@dataclass(frozen=True)
class UnrolledChain:
    """A program drafting ``depth`` greedy tokens in one call (it feeds ``depth - 1``)."""

    step: StepFunction
    depth: int


@dataclass
class DraftModelDrafter:
    step: StepFunction
    cache: KVCache
    chunk: int
    sampling: SamplingConfig
    rng: np.random.Generator
    shape: TreeShape = TreeShape()
    adaptive: bool = False
    chain: UnrolledChain | None = None
    length: AdaptiveLength = field(init=False)
    _context_slots: int = 0  # cache slots holding committed tokens (scratch follows)
    _last: _Growing | None = None
    # The last call's nodes below the scratch (node -> its row) and its present rows: kept
    # if accepted.
    _fed: tuple[dict[int, int], np.ndarray] | None = None

    def __post_init__(self):
        self.length = AdaptiveLength(self.shape.max_depth)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        depth = self.length.current if self.adaptive else self.shape.max_depth
        budget = min(budget, self.cache.max_seq - len(context) - 2)
        self._last, self._fed = None, None
        if depth <= 0 or budget <= 0:
            return Draft.root_only(root)
        tokens = [*context, root]
        if self._chains(depth, len(tokens)):
            return self._propose_unrolled(tokens, min(depth, budget))
        logits = prefill(self.step, self.cache, tokens[self.cache.length:], self.chunk)["logits"][0, -1]
        self._context_slots = self.cache.length
        tree = _Growing([root])
        frontier = {0: logits}
        for d in range(1, depth + 1):
            grown = self._expand(tree, frontier, self.shape.width(d), budget)
            if not grown:
                break
            frontier = self._evaluate(tree, grown) if d < depth else {}
        self._last = tree
        return tree.draft(self.shape.children)

    def _chains(self, depth: int, length: int) -> bool:
        """Whether this draft is the unrolled chain's: greedy, a chain no deeper than it,
        and room for its rows (the catch-up is at least the root)."""
        shape, chain = self.shape, self.chain
        return (chain is not None and self.sampling.greedy and not shape.branching
                and not shape.confidence and depth <= chain.depth
                and length + chain.depth - 1 <= self.cache.max_seq)

    def _propose_unrolled(self, tokens: list[int], depth: int) -> Draft:
        cache, calls = self.cache, self.chain.depth
        catch_up = tokens[cache.length:]
        # A prompt: all but the root as prefill would (the chain needs a past, T >= 1).
        if len(catch_up) > self.chunk or not cache.length:
            prefill(self.step, cache, catch_up[:-1], self.chunk)
            catch_up = catch_up[-1:]
        n = len(catch_up)
        # The committed slots alone as the past: the chain's later calls read its rows right
        # after them, and a compact-mask lowering needs the valid slots to be a prefix.
        fed, positions, mask = refeed_inputs(tokens, cache.length, len(tokens), cache.length)
        out = self.chain.step(fed, positions, cache.prefix(cache.length), mask)
        cache.commit(out["present"], np.arange(n + calls - 1))
        self._context_slots = cache.length - (calls - 1)
        tree = _Growing([tokens[-1]])
        for node, token in enumerate(out[DRAFTED][0, :depth].tolist()):
            tree.add(token, node, None)
        # Node j (1..calls-1) was fed by call j: its rows follow the catch-up.
        tree.scratch = list(range(1, min(depth, calls - 1) + 1))
        self._last = tree
        return tree.draft(self.shape.children)

    def _expand(self, tree: _Growing, frontier: dict[int, np.ndarray], width: int,
                budget: int) -> list[int]:
        grown = []
        for node, logits in frontier.items():
            if self.shape.confidence and top1_probability(logits) < self.shape.confidence:
                continue
            q = None if self.sampling.greedy else probabilities(logits, self.sampling)
            for token in self._children(logits, q, width):
                if len(tree.tokens) > budget:
                    return grown
                grown.append(tree.add(int(token), node, q))
        return grown

    def _children(self, logits: np.ndarray, q: np.ndarray | None, width: int) -> np.ndarray:
        if q is None:  # greedy: the draft's top tokens, the first being its argmax
            return top_tokens(logits, width)
        if self.shape.children is ChildSampling.IID:
            return self.rng.choice(len(q), size=width, p=q)
        return sample_distinct(q, width, self.rng)

    def _evaluate(self, tree: _Growing, nodes: list[int]) -> dict[int, np.ndarray]:
        """One draft call over ``nodes`` (one depth) and their ancestors below the scratch;
        the draft's logits at ``nodes``."""
        fed = sorted({a for v in nodes for a in (*tree.ancestors[v], v)} - set(tree.scratch))
        n = len(fed)
        past = self.cache.past_for(n)
        mask = np.zeros((n, past.shape[4] + n), dtype=bool)
        mask[:, : self.cache.length] = True  # the context, the root and the scratch chain
        index = {v: i for i, v in enumerate(fed)}
        for row, node in enumerate(fed):  # itself and its ancestors below the scratch
            seen = [index[a] for a in (*tree.ancestors[node], node) if a in index]
            mask[row, past.shape[4] + np.asarray(seen)] = True
        positions = self._context_slots - 1 + np.asarray([tree.depth[v] for v in fed])
        tokens = np.asarray([tree.tokens[v] for v in fed], dtype=np.int64)
        out = self.step(tokens[None], positions[None], past, mask[None])
        if len(nodes) == 1:  # a chain down to the node, and every later node is below it
            self.cache.commit(out["present"], np.arange(n))
            tree.scratch += fed
            self._fed = None
        else:
            self._fed = (index, out["present"])
        logits = out["logits"][0]
        return {v: logits[index[v]] for v in nodes}

    def observe(self, context: list[int], result: Verification) -> None:
        tree, path = self._last, list(result.path[1:])
        if tree is not None:
            kept = 0  # the accepted path's nodes in the scratch chain
            while kept < min(len(path), len(tree.scratch)) and path[kept] == tree.scratch[kept]:
                kept += 1
            self.cache.truncate(self._context_slots + kept)
            if kept == len(tree.scratch) and self._fed is not None:
                fed, present = self._fed
                rows = []
                for node in path[kept:]:  # then the last call's rows, while they are on it
                    if node not in fed:
                        break
                    rows.append(fed[node])
                if rows:
                    self.cache.commit(present, rows)
        self.length.update(result)


def top1_probability(logits: np.ndarray) -> float:
    """A drafter's own top-1 probability (temperature 1): its confidence."""
    z = logits - logits.max()
    return float(1.0 / np.exp(z).sum())
