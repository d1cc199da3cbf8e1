"""Sliding windows in tree attention (``leapc.tree_attention``'s ``window``): the reference
equals the capture's own definition of a window (positions, not list places), every ONNX
lowering and AOTInductor's decomposition equal the reference, and the width-invariant
lowerings keep a token's row bit-identical however the step is laid out, windowed too.
(leapc's kernel itself, at more shapes: test_tree_attention_kernel.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_tree_attention import attention_inputs
from test_width_invariance import INVARIANT, export_attention, one_token_rows, run
from trees import dense_mask, random_tree, stack_masks

from leapc.ir.capture import _within_window
from leapc.kernels import reference
from leapc.kernels.tree_attention import past_lengths, tree_part
from leapc.runtime.backends.aoti import fused_sdpa
from leapc.runtime.manifest import Attention

SCALE, WINDOW = 0.3, 5  # shorter than most pasts below and than the trees' deeper paths
SHAPES = [(1, 4, 2, 1, 9, 32), (3, 4, 2, 16, 12, 32), (2, 6, 6, 7, 40, 16)]


def windowed_sdpa(q, k, v, past_len, tree_mask, window: int):
    """Dense SDPA under the step mask narrowed as `ir.capture` narrows it: by positions
    (cache slot j at j, a node at past_len + its depth), not by places in a list."""
    past = k.shape[2] - q.shape[2]
    positions = past_len[:, None] + tree_mask.sum(-1) - 1
    mask = dense_mask(past_len, tree_mask, past) & _within_window(positions, past, window)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=SCALE, enable_gqa=True)


@pytest.mark.parametrize("window", (1, WINDOW, 64))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_reference_is_the_captures_window(shape, window):
    inputs = attention_inputs(*shape, seed=window)
    want = windowed_sdpa(*inputs, window)
    torch.testing.assert_close(reference.tree_attention(*inputs, SCALE, 0.0, window), want)
    torch.testing.assert_close(fused_sdpa(*inputs, SCALE, 0.0, window), want)
    torch.testing.assert_close(fused_sdpa(*inputs, SCALE, 1.5, window),
                               reference.tree_attention(*inputs, SCALE, 1.5, window))


class _Windowed(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.ops.leapc.tree_attention(q, k, v, past_lengths(mask), tree_part(mask), SCALE,
                                              0.0, WINDOW)


def _session(tmp_path, heads: int, kv_heads: int, attention: Attention):
    return export_attention(tmp_path, heads, kv_heads, attention, _Windowed())[0]


@pytest.mark.parametrize("attention", [Attention.TREE, *INVARIANT], ids=str)
def test_every_onnx_lowering_keeps_the_window(tmp_path, attention):
    session = _session(tmp_path, 4, 2, attention)
    for shape in SHAPES[:2]:
        q, k, v, past_len, tree_mask = attention_inputs(*shape, seed=7)
        got = run(session, q.numpy(), k.numpy(), v.numpy(),
                  dense_mask(past_len, tree_mask, shape[4]).numpy())
        want = windowed_sdpa(q, k, v, past_len, tree_mask, WINDOW)
        np.testing.assert_allclose(got, want.numpy(), atol=2e-6)


@pytest.mark.parametrize("attention", INVARIANT, ids=str)
@pytest.mark.parametrize("past_len,slots", [(1, 64), (37, 64), (300, 320)])
def test_a_windowed_row_is_bit_identical_in_a_wide_step(tmp_path, past_len, slots, attention):
    """A node's row in a 12-node tree step (free slots between the past and the tree)
    equals its row alone over its own keys, the window taking the last 5 of them."""
    session = _session(tmp_path, 10, 2, attention)
    g = torch.Generator().manual_seed(past_len)
    nodes = 12
    tree_mask = stack_masks([random_tree(nodes, g)])
    q = torch.randn(1, 10, nodes, 32, generator=g).numpy()
    k, v = (torch.randn(1, 2, slots + nodes, 32, generator=g).numpy() for _ in range(2))
    mask = dense_mask(torch.tensor([past_len]), tree_mask, slots).numpy()
    wide = run(session, q, k, v, mask)
    assert np.array_equal(wide, one_token_rows(session, q, k, v, past_len, tree_mask[0].numpy()))
