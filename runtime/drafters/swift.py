"""SWIFT on an ahead-of-time engine: choose the skip set while generating.

SWIFT (Xia et al. 2024) optimises the layer-skip set on the fly, per input, because the best
set depends on the text. An engine's programs are lowered ahead of time, so the sets it
can draft with are the ones the build lowered (`--skip auto` keeps every set it measured).
`swift` tries each in turn for its first ``trial_steps`` steps, scoring a set by the
tokens its steps emitted per second of drafting and verification, then drafts with the
best (re-scored as it goes: a set that stops paying off is overtaken). Chains stop at the
first token whose draft top-1 probability is below the confidence (SWIFT's dynamic stop).

Which set drafts a step depends only on earlier steps, and each draft carries the q it
was sampled from, so rule 1 / rule 2 stay exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.cache_chain import LayerSkipDrafter


@dataclass
class SwiftDrafter:
    candidates: list[LayerSkipDrafter]
    trial_steps: int = 3  # steps each candidate drafts before the best is chosen
    _rates: list[list[float]] = field(init=False)
    _current: int = 0
    _started: float = 0.0

    def __post_init__(self):
        self._rates = [[] for _ in self.candidates]

    @property
    def chosen(self) -> int:
        """The candidate drafting now: the least tried while trials last, then the best."""
        tried = [len(r) for r in self._rates]
        if min(tried) < self.trial_steps:
            return int(np.argmin(tried))
        return int(np.argmax([np.mean(r[-self.trial_steps:]) for r in self._rates]))

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        self._current = self.chosen
        self._started = time.perf_counter()
        return self.candidates[self._current].propose(context, root, budget)

    def observe(self, context: list[int], result: Verification) -> None:
        elapsed = time.perf_counter() - self._started
        self._rates[self._current].append(len(result.emitted) / elapsed)
        self.candidates[self._current].observe(context, result)
