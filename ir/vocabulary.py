"""Logits over part of the vocabulary, as logits over all of it.

A draft program projecting onto a subset of the vocabulary (`--draft-vocab`,
`passes.restrict_draft_vocabulary`, the heads program) still returns ``[..., V]`` logits,
so its signature and every drafter reading it stay as they are.
"""

from __future__ import annotations

import torch


def spread(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``logits [..., K]`` of tokens ``ids [K]`` as ``[..., V]``, ``-inf`` elsewhere (the
    other tokens' probability is 0)."""
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.scatter(-1, ids.expand(logits.shape), logits)
