"""SWIFT on an ahead-of-time engine: choose the skip set while generating.

SWIFT (Xia et al. 2024) optimises the layer-skip set on the fly, per input, because the best
set depends on the text. An engine's programs are lowered ahead of time, so the sets it
can draft with are the ones the build lowered (`--skip auto` keeps every set it measured).
Every ``rescore_every`` steps (the first time on the prompt), ``swift`` scores each set by
one parallel forward over the last ``window`` committed tokens, as SWIFT does: how often
the set's argmax is the token that followed (its acceptance rate a), and the forward's
time relative to the full step's over the same window (r, a draft call's relative cost).
The set drafting next maximises the expected speedup of chains of d tokens,

    E[tokens per verify] / cost = (1 - a^(d+1)) / (1 - a) / (d * r + 1)

(Leviathan et al. 2023). Chains stop at the first token whose draft top-1 probability is
below the confidence (SWIFT's dynamic stop). The window's rows are never written: the
forward reads the committed cache before the window only, and passes only those slots as
its past, so it fits the programs' bounds however close the context is to max_seq.

Which set drafts a step depends only on earlier steps, and each draft carries the q it
was sampled from, so rule 1 / rule 2 stay exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from leapc.runtime.decode import refeed_inputs
from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.cache_chain import LayerSkipDrafter
from leapc.runtime.step import StepFunction

MIN_WINDOW = 4  # fewer tokens say nothing about a set: keep the current one


def expected_speedup(acceptance: float, depth: int, relative_cost: float) -> float:
    """Tokens per verify of a chain of ``depth`` with i.i.d. acceptance, per unit of time
    (a full step costs 1, a draft call ``relative_cost``)."""
    tokens = depth + 1 if acceptance >= 1 else (1 - acceptance ** (depth + 1)) / (1 - acceptance)
    return tokens / (depth * relative_cost + 1)


@dataclass
class SwiftDrafter:
    candidates: list[LayerSkipDrafter]
    full: StepFunction  # the target step: the cost the window forwards are measured against
    current: int = 0  # the set drafting until the first scoring: the build's fastest
    window: int = 32
    rescore_every: int = 64  # steps between scorings (each costs a few full forwards)
    chunk: int | None = None  # the programs' N bound (the engine's max_new): caps the window
    scores: list[float] = field(init=False, default_factory=list)  # the last scoring's
    _steps: int = 0

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        # With no room to draft (the last token before a limit) a scoring would go unused.
        if budget > 0 and self._steps % self.rescore_every == 0:
            self._score(context, root)
        self._steps += 1
        return self.candidates[self.current].propose(context, root, budget)

    def observe(self, context: list[int], result: Verification) -> None:
        self.candidates[self.current].observe(context, result)

    def _score(self, context: list[int], root: int) -> None:
        cache = self.candidates[0].cache
        window = self.window if self.chunk is None else min(self.window, self.chunk)
        n = min(window, cache.length)
        if n < MIN_WINDOW:
            return
        start = cache.length - n
        past = cache.prefix(start)[: cache.layers]  # T + N: the cache's length (+1 if start is 0)
        *inputs, mask = refeed_inputs(context, start, cache.length, past.shape[4])
        following = np.asarray([*context[start + 1 :], root])
        full = _timed(lambda: self.full(*inputs, past, mask))[1]
        self.scores = []
        for candidate in self.candidates:
            out, seconds = _timed(lambda c=candidate: c._run(*inputs, past, mask))
            agreement = float((out["logits"][0].argmax(-1) == following).mean())
            self.scores.append(expected_speedup(agreement, candidate.max_depth, seconds / full))
        self.current = int(np.argmax(self.scores))


def _timed(call):
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start
