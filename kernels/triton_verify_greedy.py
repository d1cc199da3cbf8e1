"""Triton kernel for ``leapc::verify_greedy``: the longest root-to-node path of a token tree
whose drafted tokens equal the target's argmax at their parents.

Semantics: `leapc.kernels.reference.verify_greedy` (the ground truth, itself checked
against `leapc.runtime.acceptance`). Greedy acceptance is a walk down the tree: at the
current node c, the next node is the smallest-index child x (``parents[x] == c``) with
``tokens[x] == target[c]``; the walk ends at a node with no such child.

One program walks one batch row. The whole row (N is a tree: tens of nodes) sits in one
block, so each step of the walk is one vector comparison over all nodes and a minimum
over the matching indices (the smallest index wins, the reference's tie rule). A step
that finds no match leaves the current node unchanged, and then every later step asks
the same question and finds nothing again, so the loop can run all N - 1 possible steps
without branching out early: steps after the end write nothing.

Tested against the reference under ``TRITON_INTERPRET=1`` on CPU tensors
(tests/kernels/test_triton_verify_greedy.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leapc.kernels.verify_greedy import check_shapes


@triton.jit
def _verify_greedy_kernel(
    target_ptr, tokens_ptr, parents_ptr, path_ptr, length_ptr,
    stride_gb, stride_gn, stride_tb, stride_tn, stride_pb, stride_pn, stride_ob, stride_on,
    new,
    BLOCK_N: tl.constexpr,
):
    batch = tl.program_id(0)
    nodes = tl.arange(0, BLOCK_N)
    in_tree = nodes < new
    tokens = tl.load(tokens_ptr + batch * stride_tb + nodes * stride_tn, mask=in_tree)
    parents = tl.load(parents_ptr + batch * stride_pb + nodes * stride_pn, mask=in_tree)
    row_path = path_ptr + batch * stride_ob

    current = tl.full((), 0, tl.int32)  # the root
    length = tl.full((), 1, tl.int32)
    tl.store(row_path, current.to(tl.int64))
    for step in range(1, new):
        wanted = tl.load(target_ptr + batch * stride_gb + current * stride_gn)
        match = in_tree & (parents == current) & (tokens == wanted)
        child = tl.min(tl.where(match, nodes, BLOCK_N), axis=0)  # BLOCK_N: no match
        found = child < BLOCK_N
        current = tl.where(found, child, current)
        tl.store(row_path + step * stride_on, current.to(tl.int64), mask=found)
        length += found.to(tl.int32)
    tl.store(length_ptr + batch, length.to(tl.int64))


def verify_greedy(target: torch.Tensor, tokens: torch.Tensor,
                  parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: same arguments and results as the reference."""
    check_shapes(target, tokens, parents)
    batch, new = tokens.shape
    path = torch.full((batch, new), -1, dtype=torch.int64, device=tokens.device)
    length = torch.empty(batch, dtype=torch.int64, device=tokens.device)
    _verify_greedy_kernel[(batch,)](
        target, tokens, parents, path, length,
        *target.stride(), *tokens.stride(), *parents.stride(), *path.stride(),
        new, BLOCK_N=triton.next_power_of_2(new),
    )
    return path, length
