"""LayerSkip self-speculation with cache reuse: the first E layers draft, the rest verify.

The ``draft`` program (layers < E and the exit, `passes/slice_early_exit.py`) writes the
very KV rows the full model writes for layers < E, so it drafts inside the target's own
cache: call i feeds chain token i, attends to the committed context and the chain before
it, writes its rows for layers < E at slot ``length + i`` (scratch: not committed), and
returns the exit's logits (the next draft token) and the hidden state entering layer E.
Verification runs only the ``remainder`` program (layers >= E) over those hidden states,
so layers < E are never run twice for a token. When a token is accepted its rows for
layers < E are already in place; commit writes its rows for layers >= E.

A chain of k drafted tokens costs k + 1 draft calls (the root's and each drafted token's:
the last call's logits go unused, its hidden state is what verification needs) and one
remainder call over k + 1 nodes. Kangaroo's double exit stops the chain at the first token
whose exit top-1 probability is below a confidence (that token's call still ran, so it is
the chain's last node).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leapc.ir.tree import chain
from leapc.runtime.backends.base import StepFunction
from leapc.runtime.decode import tree_inputs
from leapc.runtime.drafters.base import AdaptiveLength, Draft, Verification
from leapc.runtime.drafters.draft_model import top1_probability
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.sampling import SamplingConfig, probabilities


@dataclass
class EarlyExitDrafter:
    draft: StepFunction
    remainder: StepFunction
    cache: KVCache  # the target's: layers < E are the draft's to write
    exit_layer: int
    sampling: SamplingConfig
    rng: np.random.Generator
    max_depth: int
    confidence: float = 0.0  # Kangaroo: stop below this exit top-1 probability
    adaptive: bool = False
    length: AdaptiveLength = field(init=False)
    _hidden: list[np.ndarray] = field(default_factory=list)  # per chain node: [H]

    def __post_init__(self):
        self.length = AdaptiveLength(self.max_depth)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        depth = self.length.current if self.adaptive else self.max_depth
        # Each chain node's scratch slot, and its call's own row, must fit max_seq.
        depth = max(0, min(depth, budget, self.cache.max_seq - self.cache.length - 2))
        tokens, q = [root], []
        self._hidden = []
        for offset in range(depth + 1):
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

    def _call(self, token: int, offset: int) -> np.ndarray:
        """Run chain node ``offset`` through layers < E; keep its rows and hidden state."""
        cache = self.cache
        past = cache.past_for(1)[: self.exit_layer]
        mask = np.zeros((1, 1, past.shape[4] + 1), dtype=bool)
        mask[..., : cache.length + offset] = True
        mask[..., -1] = True
        position = np.asarray([[cache.length + offset]], dtype=np.int64)
        out = self.draft(np.asarray([[token]], dtype=np.int64), position, past, mask)
        cache.write_scratch(out["present"], offset)
        self._hidden.append(out["hidden"][0, 0])
        return out["logits"][0, 0]

    def _next(self, logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        if self.sampling.greedy:
            return int(np.argmax(logits)), None
        dist = probabilities(logits, self.sampling)
        return int(self.rng.choice(len(dist), p=dist)), dist

    def verify(self, cache: KVCache, draft: Draft) -> dict[str, np.ndarray]:
        """The remainder over the chain's hidden states; ``present`` holds every layer's
        rows (the draft's own for layers < E, read before the step may resize the cache)."""
        n = draft.tree.size
        below = cache.buffer[: self.exit_layer, :, :, :, cache.length : cache.length + n].copy()
        _, positions, past, mask = tree_inputs(cache, draft)
        hidden = np.stack(self._hidden)[None]
        out = self.remainder(hidden, positions, past[self.exit_layer:], mask)
        return {"logits": out["logits"], "present": np.concatenate([below, out["present"]])}

    def observe(self, context: list[int], result: Verification) -> None:
        self.length.update(result)

