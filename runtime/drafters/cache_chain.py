"""Drafting a chain inside the target's own KV cache, with a program cut from the target.

Self-speculative drafts (an early exit, a layer-skip draft) read the target's committed
rows as their past. Call i feeds chain node i (the root first) at position ``length + i``,
attends to the committed slots and the chain before it, and writes its rows for the
cache's first layers at slot ``length + i`` as scratch (`KVCache.write_scratch`, not
committed): the next call reads them; verification either keeps them (an early exit's rows
are the target's) or overwrites them when it commits. Children are the program's argmax
(greedy) or a draw from q, its distribution after the target's temperature / top-k /
top-p, which rule 2 needs. With a confidence, the chain stops at the first node whose
top-1 probability (temperature 1) is below it: Kangaroo's double exit, SWIFT's stop.

Greedy chains run in one call when the engine has the program unrolled (`UnrolledChain`):
every node's rows are written as scratch at once and each node's outputs are its row of
the chain's; a confidence stop cuts the drafted tokens where the step-by-step chain would
have stopped (the later rows are computed, and unused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from leapc.ir.tree import chain
from leapc.runtime.drafters.base import AdaptiveLength, Draft, Verification
from leapc.runtime.drafters.draft_model import UnrolledChain, top1_probability
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.sampling import SamplingConfig, probabilities
from leapc.runtime.step import DRAFTED, StepFunction


@dataclass
class CacheChainDrafter:
    draft: StepFunction
    cache: KVCache  # the target's
    layers: int  # the draft's past / present: the cache's first ``layers`` layers
    sampling: SamplingConfig
    rng: np.random.Generator
    max_depth: int
    confidence: float = 0.0
    adaptive: bool = False
    chain: UnrolledChain | None = None
    length: AdaptiveLength = field(init=False)
    _calls: list[dict[str, np.ndarray]] = field(init=False, default_factory=list)  # this chain's
    # 1: the last drafted token is fed too (its outputs are what verification needs).
    closing_call: ClassVar[int] = 0

    def __post_init__(self):
        self.length = AdaptiveLength(self.max_depth)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        depth = self.length.current if self.adaptive else self.max_depth
        # Each chain node's scratch slot, and its call's own row, must fit max_seq.
        depth = max(0, min(depth, budget, self.cache.max_seq - self.cache.length - 2))
        if self._chains(depth):
            return self._propose_unrolled(root, depth)
        tokens, q = [root], []
        self._calls = []
        for offset in range(depth + self.closing_call):
            logits = self._call(tokens[offset], offset)
            if offset == depth or (self.confidence and top1_probability(logits) < self.confidence):
                break
            token, dist = self._next(logits)
            tokens.append(token)
            q.append(dist)
        drafted = np.asarray(tokens, dtype=np.int64)
        if self.sampling.greedy or not q:
            return Draft(drafted, chain(len(q)))
        return Draft(drafted, chain(len(q)), np.stack([np.zeros_like(q[0]), *q]))

    def _chains(self, depth: int) -> bool:
        """Greedy, no deeper than the unrolled chain, and room for its rows."""
        chain = self.chain
        return (chain is not None and self.sampling.greedy and 0 < depth <= chain.depth
                and self.cache.length + chain.depth + self.closing_call <= self.cache.max_seq)

    def _propose_unrolled(self, root: int, depth: int) -> Draft:
        cache = self.cache
        # The committed slots alone: the chain's rows go right after its past, and the
        # tree lowering's compact mask needs the valid slots to be a prefix (`KVCache`).
        past = cache.buffer[: self.layers, :, :, :, : cache.length]
        mask = np.ones((1, 1, cache.length + 1), dtype=bool)
        position = np.asarray([[cache.length]], dtype=np.int64)
        out = self.chain.step(np.asarray([[root]], dtype=np.int64), position, past, mask)
        cache.write_scratch(out["present"], 0)
        drafted = out[DRAFTED][0, :depth].tolist()
        if self.confidence:  # where the step-by-step chain stops: a node it is unsure after
            sure = [top1_probability(row) >= self.confidence for row in out["logits"][0, :depth]]
            drafted = drafted[: sure.index(False) if False in sure else depth]
        rows = len(drafted) + self.closing_call
        self._calls = [{name: value[:, i : i + 1] for name, value in out.items()
                        if name not in ("present", DRAFTED)} for i in range(rows)]
        return Draft(np.asarray([root, *drafted], dtype=np.int64), chain(len(drafted)))

    def _call(self, token: int, offset: int) -> np.ndarray:
        """Run chain node ``offset``; keep its rows as scratch and its outputs."""
        cache = self.cache
        past = cache.past_for(1)
        mask = np.zeros((1, 1, past.shape[4] + 1), dtype=bool)
        mask[..., : cache.length + offset] = True
        mask[..., -1] = True
        position = np.asarray([[cache.length + offset]], dtype=np.int64)
        out = self._run(np.asarray([[token]], dtype=np.int64), position, past, mask)
        cache.write_scratch(out["present"], offset)
        self._calls.append(out)
        return out["logits"][0, 0]

    def _run(self, tokens: np.ndarray, positions: np.ndarray, past: np.ndarray,
             mask: np.ndarray) -> dict[str, np.ndarray]:
        """The draft program on the cache's first ``layers`` layers."""
        return self.draft(tokens, positions, past[: self.layers], mask)

    def _next(self, logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        if self.sampling.greedy:
            return int(np.argmax(logits)), None
        dist = probabilities(logits, self.sampling)
        return int(self.rng.choice(len(dist), p=dist)), dist

    def observe(self, context: list[int], result: Verification) -> None:
        self.length.update(result)


class LayerSkipDrafter(CacheChainDrafter):
    """Draft&Verify / SWIFT: the target with some sublayers bypassed drafts; its rows (every
    layer) are scratch the target's verify step overwrites when it commits."""
