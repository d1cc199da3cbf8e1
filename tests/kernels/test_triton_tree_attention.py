"""The Triton ``tree_attention`` kernel against the reference: GQA ratios 1/2/4, head dims
that are not powers of two, N = 1, deep chains, random trees, empty and full pasts,
per-row past lengths, many key blocks (``block_t=16``) and many row blocks.

On the CPU the kernel runs in Triton's interpreter (slow: shapes stay small)."""

from __future__ import annotations

import pytest
import torch
from trees import random_tree, stack_masks

from leapc.ir.tree import chain

pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it on Linux)")

from leapc.kernels import reference  # noqa: E402
from leapc.kernels import tree_attention as declaration  # noqa: E402
from leapc.kernels.triton_tree_attention import tree_attention  # noqa: E402

SCALE = 0.3


def attention_inputs(shape, past_lengths="random", trees=None, value_dim=None, seed=0):
    """``(q, k, v, past_len, tree_mask)`` for ``shape = (batch, heads, kv_heads, new, past,
    head_dim)``: past lengths drawn per row in 0 .. past ("random"), all 0 ("empty") or
    all ``past`` ("full"); one random tree per row unless ``trees`` are given."""
    batch, heads, kv_heads, new, past, head_dim = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, new, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, past + new, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, past + new, value_dim or head_dim, generator=g)
    past_len = {"random": torch.randint(0, past + 1, (batch,), generator=g),
                "empty": torch.zeros(batch, dtype=torch.int64),
                "full": torch.full((batch,), past)}[past_lengths]
    trees = trees or [random_tree(new, g) for _ in range(batch)]
    return q, k, v, past_len, stack_masks(trees)


def assert_matches_reference(inputs, device, **blocks):
    inputs = [t.to(device) for t in inputs]
    got = tree_attention(*inputs, SCALE, **blocks)
    torch.testing.assert_close(got, reference.tree_attention(*inputs, SCALE))


# (batch, heads, kv_heads, new, past, head_dim)
SHAPES = [
    (1, 4, 4, 1, 7, 16),  # plain decode (N = 1: a single-node tree), no GQA
    (2, 8, 2, 1, 37, 20),  # decode, GQA 4: the G heads of a KV head share one program
    (2, 4, 2, 5, 40, 24),  # GQA 2, three key blocks of the past, head dim 24
    (3, 8, 2, 16, 5, 40),  # GQA 4, more new tokens than past slots, head dim 40
    (2, 6, 3, 12, 1, 8),  # a single past slot, head dim below the 16-wide block
    (1, 8, 1, 20, 10, 12),  # 160 query rows: five row blocks of 32
]


@pytest.mark.parametrize("past_lengths", ["random", "empty", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_trees_match_reference(triton_device, shape, past_lengths):
    inputs = attention_inputs(shape, past_lengths)
    assert_matches_reference(inputs, triton_device, block_m=32, block_t=16)


def test_rows_with_different_past_lengths_match_reference(triton_device):
    """Each row walks its own number of past blocks (0, 1, 2 and 3 of 16 slots)."""
    q, k, v, _, tree_mask = attention_inputs((4, 4, 2, 6, 48, 16))
    past_len = torch.tensor([0, 9, 32, 48])
    assert_matches_reference((q, k, v, past_len, tree_mask), triton_device, block_t=16)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_deep_chain_matches_reference(triton_device, group):
    """A 40-deep chain (causal attention over the tree), tree keys in three blocks."""
    shape = (2, 2 * group, 2, 40, 9, 24)
    inputs = attention_inputs(shape, "full", trees=[chain(39)] * 2)
    assert_matches_reference(inputs, triton_device, block_t=16)


def test_value_dim_differs_from_head_dim(triton_device):
    inputs = attention_inputs((2, 4, 2, 7, 11, 24), value_dim=40)
    assert_matches_reference(inputs, triton_device, block_t=16)


@pytest.mark.parametrize("group", [1, 4])
def test_soft_capped_scores_match_reference(triton_device, group):
    """Gemma 2's attention logit soft-capping, over cache and tree blocks; queries scaled
    so that most scores pass the cap."""
    q, k, v, past_len, tree_mask = attention_inputs((2, 2 * group, 2, 6, 20, 24))
    inputs = [t.to(triton_device) for t in (3 * q, k, v, past_len, tree_mask)]
    got = tree_attention(*inputs, SCALE, 1.5, block_t=16)
    want = reference.tree_attention(*(t.cpu() for t in inputs), SCALE, 1.5)
    assert (want - reference.tree_attention(*(t.cpu() for t in inputs), SCALE)).abs().max() > 0.1
    torch.testing.assert_close(got.cpu(), want)


def test_strided_inputs_match_reference(triton_device):
    """Queries as the model makes them, ``[B, N, H, D]`` transposed: strides, not copies."""
    q, k, v, past_len, tree_mask = attention_inputs((2, 4, 2, 5, 9, 24))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    assert_matches_reference((q, k, v, past_len, tree_mask), triton_device)


def test_invalid_cache_slots_are_never_read(triton_device):
    """Slots at or past ``past_len`` may hold anything, NaN included: the kernel never
    loads them (the reference, which multiplies their zero weights, would give NaN)."""
    q, k, v, past_len, tree_mask = attention_inputs((2, 4, 2, 5, 20, 16))
    past_len = torch.tensor([3, 17])
    want = reference.tree_attention(q, k, v, past_len, tree_mask, SCALE)
    slots = torch.arange(k.shape[2])
    invalid = (slots[None, :] >= past_len[:, None]) & (slots[None, :] < 20)  # [B, T + N]
    k = k.masked_fill(invalid[:, None, :, None], float("nan"))
    v = v.masked_fill(invalid[:, None, :, None], float("nan"))
    inputs = [t.to(triton_device) for t in (q, k, v, past_len, tree_mask)]
    got = tree_attention(*inputs, SCALE, block_t=16)
    torch.testing.assert_close(got.cpu(), want)


def test_half_precision_matches_reference(triton_device):
    inputs = list(attention_inputs((2, 4, 2, 6, 20, 24)))
    inputs[:3] = [t.half() for t in inputs[:3]]
    inputs = [t.to(triton_device) for t in inputs]
    got = tree_attention(*inputs, SCALE, block_t=16)
    want = reference.tree_attention(*(t.float() if t.is_floating_point() else t
                                      for t in inputs), SCALE)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_cuda_registration_launches_this_kernel(triton_device):
    """The op's CUDA implementation (registered because triton is installed) is this kernel."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("leapc::tree_attention", "CUDA")
    inputs = [t.to(triton_device) for t in attention_inputs((2, 4, 2, 3, 5, 16))]
    torch.testing.assert_close(declaration.triton_kernel(*inputs, SCALE),
                               tree_attention(*inputs, SCALE))


def test_mismatched_heads_are_refused(triton_device):
    inputs = attention_inputs((1, 4, 3, 2, 2, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        tree_attention(*inputs, SCALE)
