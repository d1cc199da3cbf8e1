"""Random token trees and the dense step masks the runtime builds for them (shared by the
kernel, pass and backend tests)."""

from __future__ import annotations

import numpy as np
import torch

from leapc.ir.tree import TreeBuffers, tree_from_parents


def random_tree(size: int, generator: torch.Generator) -> TreeBuffers:
    """A tree of ``size`` nodes, each non-root node's parent drawn uniformly before it."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, size)]
    return tree_from_parents(parents)


def stack_masks(trees: list[TreeBuffers]) -> torch.Tensor:
    """``[B, N, N]`` ancestor masks."""
    return torch.from_numpy(np.stack([t.ancestor_mask for t in trees]))


def dense_mask(past_len: torch.Tensor, tree_mask: torch.Tensor, past: int) -> torch.Tensor:
    """The step program's ``[B, N, T + N]`` mask: a valid prefix of ``past_len[b]`` cache
    slots for every new token, then the tree."""
    batch, new, _ = tree_mask.shape
    valid = torch.stack([torch.arange(past) < n for n in past_len.tolist()])
    return torch.cat([valid[:, None].expand(batch, new, past), tree_mask], dim=-1)


def stack_parents(trees: list[TreeBuffers]) -> torch.Tensor:
    """``[B, N]`` int64 parent indices (-1 for the root)."""
    return torch.from_numpy(np.stack([t.parents for t in trees]))


def greedy_step(trees: list[TreeBuffers], vocab: int, generator: torch.Generator):
    """``(target, tokens, parents)``, each ``[B, N]``: random drafted tokens and target
    argmaxes from a small vocabulary, so that paths are accepted deep and sibling tokens
    often tie."""
    parents = stack_parents(trees)
    tokens = torch.randint(0, vocab, parents.shape, generator=generator)
    target = torch.randint(0, vocab, parents.shape, generator=generator)
    return target, tokens, parents


def tree_step_inputs(dims, batch: int, new: int, past: int, seed: int = 0):
    """Step inputs of a random tree per row over a cache prefix of random length per row
    (0 .. past); ``dims`` is the program's `ModelDims`."""
    g = torch.Generator().manual_seed(seed)
    trees = [random_tree(new, g) for _ in range(batch)]
    committed = torch.randint(0, past + 1, (batch,), generator=g)
    tokens = torch.randint(0, dims.vocab_size, (batch, new), generator=g)
    depth = torch.from_numpy(np.stack([t.depth for t in trees]))
    kv = torch.randn(dims.num_layers, 2, batch, dims.num_kv_heads, past, dims.head_dim,
                     generator=g)
    return tokens, committed[:, None] + depth, kv, dense_mask(committed, stack_masks(trees), past)
