"""Draft-model speculation: a small model with the same vocabulary drafts a chain.

The draft model runs in its own step program with its own KV cache. Before drafting it
catches up on the tokens the target committed since its last call (one chunked call),
then drafts one token per call, sampling from q (the draft's distribution after the
same temperature / top-k / top-p as the target) — the q that rule 2 needs. After
verification the draft cache keeps exactly the committed prefix it had computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leapc.runtime.backends.base import StepFunction
from leapc.runtime.decode import prefill, tree_inputs
from leapc.runtime.drafters.base import AdaptiveLength, Draft, Verification
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.sampling import SamplingConfig, probabilities, sample


@dataclass
class DraftModelDrafter:
    step: StepFunction
    cache: KVCache
    chunk: int
    sampling: SamplingConfig
    rng: np.random.Generator
    max_draft: int = 4
    adaptive: bool = False
    length: AdaptiveLength = field(init=False)
    _fed: list[int] = field(default_factory=list)  # tokens whose KV the draft cache holds

    def __post_init__(self):
        self.length = AdaptiveLength(self.max_draft)

    def _catch_up(self, tokens: list[int]) -> np.ndarray:
        """Feed the tokens the draft cache lacks; return the logits after the last one."""
        missing = tokens[self.cache.length :]
        self._fed = tokens[:]
        return prefill(self.step, self.cache, missing, self.chunk)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        wanted = min(self.length.current if self.adaptive else self.max_draft, budget,
                     self.cache.max_seq - len(context) - 2)
        if wanted <= 0:
            return Draft.root_only(root)
        logits = self._catch_up([*context, root])
        drafted, qs = [], [np.zeros(len(logits))]
        for i in range(wanted):
            q = probabilities(logits, self.sampling)
            token = sample(logits, self.sampling, self.rng)
            drafted.append(token)
            qs.append(q)
            if i + 1 < wanted:  # the last drafted token is never fed: nothing reads it
                out = self.step(*tree_inputs(self.cache, Draft.root_only(token)))
                self.cache.commit(out["present"], [0])
                self._fed.append(token)
                logits = out["logits"][0, -1]
        return Draft(np.asarray([root, *drafted], dtype=np.int64),
                     Draft.chain_of(root, drafted).tree, np.stack(qs))

    def observe(self, context: list[int], result: Verification) -> None:
        # The committed context and what the draft fed agree up to the first rejection.
        agree = 0
        for fed, kept in zip(self._fed, context, strict=False):
            if fed != kept:
                break
            agree += 1
        self.cache.truncate(agree)
        self._fed = self._fed[:agree]
        self.length.update(result)
