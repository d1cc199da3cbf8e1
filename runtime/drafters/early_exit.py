"""LayerSkip self-speculation with cache reuse: the first E layers draft, the rest verify.

The ``draft`` program (layers < E and the exit, `passes/slice_draft.py`) writes the
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

Kangaroo puts a trained adapter (`ir/adapter.py`) between the exit and the head. Its
attention keeps KV rows of its own, in an extra layer of the target's cache
(`KVCache(extra_layers=1)`), written as scratch like the draft's: every committed token
was a chain node fed to the draft with the committed context before it, so its adapter
row is valid once it commits. Only the prompt's rows are missing, computed by one draft
call over the prompt (in chunks) before the first chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from leapc.runtime.decode import refeed_inputs, tree_inputs
from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.cache_chain import CacheChainDrafter
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.step import StepFunction


@dataclass
class EarlyExitDrafter(CacheChainDrafter):
    """``layers`` is the exit layer E; ``remainder`` runs layers >= E."""

    remainder: StepFunction = field(kw_only=True)
    closing_call: ClassVar[int] = 1

    def verify(self, cache: KVCache, draft: Draft) -> dict[str, np.ndarray]:
        """The remainder over the chain's hidden states; ``present`` holds every layer's
        rows (the draft's own for layers < E, read before the step may resize the cache)."""
        n = draft.tree.size
        below = cache.buffer[: self.layers, :, :, :, cache.length : cache.length + n].copy()
        _, positions, past, mask = tree_inputs(cache, draft)
        hidden = np.stack([out["hidden"][0, 0] for out in self._calls[:n]])[None]
        out = self.remainder(hidden, positions, past[self.layers:], mask)
        return {"logits": out["logits"], "present": np.concatenate([below, out["present"]])}


@dataclass
class KangarooDrafter(EarlyExitDrafter):
    """``draft`` is the exit with the adapter; ``chunk`` bounds its calls' tokens."""

    chunk: int = field(kw_only=True)
    _adapted: int = field(init=False, default=0)  # leading slots with valid adapter rows

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        self._adapt(context)
        return super().propose(context, root, budget)

    def _adapt(self, context: list[int]) -> None:
        """Adapter rows for committed slots that were never chain nodes (the prompt)."""
        cache = self.cache
        for start in range(self._adapted, cache.length, self.chunk):
            end = min(start + self.chunk, cache.length)
            past = cache.prefix(start)  # the context: ``T + N`` stays within max_seq
            tokens, positions, mask = refeed_inputs(context, start, end, past.shape[4])
            out = self.draft(tokens, positions, past[: self.layers], past[cache.layers :], mask)
            cache.buffer[cache.layers :, :, :, :, start:end] = out["adapter_present"]
        self._adapted = cache.length

    def _run(self, tokens, positions, past, mask) -> dict[str, np.ndarray]:
        return self.draft(tokens, positions, past[: self.layers],
                          self.cache.buffer[self.cache.layers :], mask)

    def _call(self, token: int, offset: int) -> np.ndarray:
        logits = super()._call(token, offset)
        self.cache.write_scratch(self._calls[-1]["adapter_present"], offset, self.cache.layers)
        return logits

    def observe(self, context: list[int], result: Verification) -> None:
        super().observe(context, result)
        self._adapted = self.cache.length  # every newly committed slot was a chain node
