"""A loaded program: what the decode loop and the drafters call.

Its own module, free of the manifest and the backends, so the policy registry (which the
manifest validates against) can import the drafters without a cycle.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

# An unrolled draft chain's extra output: ``[B, depth]`` tokens (`passes/unroll_draft_chain`).
DRAFTED = "drafted"


def unrolled(program: str) -> str:
    """The name of the engine's program that runs ``program``'s greedy draft chain in one
    call (`passes/unroll_draft_chain.py`)."""
    return f"{program}_chain"


class StepFunction(Protocol):
    """``(tokens, positions, past, mask) -> outputs by name`` (``logits``, ``present``, ...)."""

    output_names: tuple[str, ...]

    def __call__(
        self, tokens: np.ndarray, positions: np.ndarray, past: np.ndarray, mask: np.ndarray
    ) -> dict[str, np.ndarray]: ...
