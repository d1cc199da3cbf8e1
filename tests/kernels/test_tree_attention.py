"""``leapc.tree_attention``: the reference against dense SDPA, the op under export, its ONNX
translation in ONNX Runtime, and the compact mask against the runtime's dense masks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from trees import dense_mask, random_tree, stack_masks

from leapc.ir.tree import chain, tree_from_parents
from leapc.kernels import reference
from leapc.kernels.onnx_translations import OPSET, translations
from leapc.kernels.tree_attention import past_lengths, tree_part
from leapc.runtime.backends.ort import session_options
from leapc.runtime.decode import tree_inputs
from leapc.runtime.drafters.base import Draft
from leapc.runtime.kv_cache import KVCache

# (batch, heads, kv_heads, new, past, head_dim)
SHAPES = [
    (1, 4, 4, 1, 7, 16),  # plain decode, no GQA
    (2, 4, 2, 5, 9, 24),  # GQA 2, head dim not a power of two
    (3, 8, 2, 16, 5, 40),  # GQA 4, more new tokens than past slots
    (2, 6, 3, 12, 1, 8),  # a single (invalid or valid) past slot
]


def attention_inputs(batch, heads, kv_heads, new, past, head_dim, seed=0, trees=None):
    """Random q/k/v, per-row past lengths (0 .. past) and a random tree per row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, new, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, past + new, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, past + new, head_dim, generator=g)
    past_len = torch.randint(0, past + 1, (batch,), generator=g)
    trees = trees or [random_tree(new, g) for _ in range(batch)]
    return q, k, v, past_len, stack_masks(trees)


def dense_sdpa(q, k, v, past_len, tree_mask, scale):
    mask = dense_mask(past_len, tree_mask, k.shape[2] - q.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_equals_dense_sdpa(shape):
    inputs = attention_inputs(*shape)
    want = dense_sdpa(*inputs, scale=0.3)
    torch.testing.assert_close(reference.tree_attention(*inputs, scale=0.3), want)
    torch.testing.assert_close(torch.ops.leapc.tree_attention(*inputs, 0.3), want)


def test_deep_chain_is_causal_attention():
    """A 64-deep chain over a fully valid past is ordinary causal attention."""
    batch, heads, kv_heads, new, past, head_dim = 2, 4, 1, 64, 3, 16
    inputs = attention_inputs(batch, heads, kv_heads, new, past, head_dim,
                              trees=[chain(new - 1)] * batch)
    q, k, v, _, tree_mask = inputs
    past_len = torch.full((batch,), past)
    got = reference.tree_attention(q, k, v, past_len, tree_mask, head_dim ** -0.5)
    causal = torch.ones(new, past + new, dtype=torch.bool).tril(past)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1),
        attn_mask=causal)
    torch.testing.assert_close(got, want)


def test_query_heads_read_their_own_kv_group():
    """Changing KV head 1 changes exactly query heads 2 and 3 (G = 2): h reads h // G."""
    q, k, v, past_len, tree_mask = attention_inputs(1, 4, 2, 3, 4, 8)
    before = reference.tree_attention(q, k, v, past_len, tree_mask, 1.0)
    v = v.clone()
    v[:, 1] += 1.0
    after = reference.tree_attention(q, k, v, past_len, tree_mask, 1.0)
    changed = (after - before).abs().amax(dim=(0, 2, 3)) > 1e-3
    assert changed.tolist() == [False, False, True, True]


def test_invalid_past_slots_and_non_ancestors_are_ignored():
    q, k, v, past_len, tree_mask = attention_inputs(2, 4, 2, 6, 8, 16)
    before = reference.tree_attention(q, k, v, past_len, tree_mask, 0.25)
    hidden = ~dense_mask(past_len, tree_mask, 8).any(dim=1)  # keys no token sees: [B, T + N]
    assert hidden.any()
    v = v.masked_fill(hidden[:, None, :, None], 1e6)
    torch.testing.assert_close(reference.tree_attention(q, k, v, past_len, tree_mask, 0.25),
                               before)


def test_export_refuses_mismatched_heads():
    inputs = attention_inputs(1, 4, 3, 2, 2, 8)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="not a multiple"):
        torch.ops.leapc.tree_attention(*(mode.from_tensor(t) for t in inputs), 1.0)


class CompactMaskAttention(torch.nn.Module):
    """Tree attention fed from a dense step mask, as the pass wires it."""

    def forward(self, q, k, v, mask):
        return torch.ops.leapc.tree_attention(q, k, v, past_lengths(mask), tree_part(mask), 0.3)


def exported_attention() -> torch.export.ExportedProgram:
    q, k, v, past_len, tree_mask = attention_inputs(2, 4, 2, 3, 5, 24)
    b, n = Dim("B", min=1, max=8), Dim("N", min=1, max=32)
    kv = {0: b, 2: Dim.AUTO}
    return torch.export.export(
        CompactMaskAttention(), (q, k, v, dense_mask(past_len, tree_mask, 5)),
        dynamic_shapes={"q": {0: b, 2: n}, "k": kv, "v": kv, "mask": {0: b, 1: n, 2: Dim.AUTO}})


def test_op_survives_export_with_dynamic_shapes():
    program = exported_attention()
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.leapc.tree_attention.default in targets
    module = program.module()
    for shape in [(1, 4, 2, 1, 1, 24), (1, 4, 2, 1, 9, 24), (3, 4, 2, 7, 2, 24)]:
        inputs = attention_inputs(*shape, seed=1)
        mask = dense_mask(inputs[3], inputs[4], shape[4])
        torch.testing.assert_close(module(*inputs[:3], mask), dense_sdpa(*inputs, scale=0.3))


def test_onnx_translation_runs_in_onnx_runtime(tmp_path):
    path = tmp_path / "tree_attention.onnx"
    torch.onnx.export(exported_attention(), dynamo=True, opset_version=OPSET,
                      custom_translation_table=translations(), verbose=False).save(str(path))
    # leapc's sessions share one global pool; ORT then refuses sessions with their own.
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(path)).graph.node
    assert {n.domain for n in nodes} == {""}  # standard ops only
    assert [n.op_type for n in nodes].count("Attention") == 1  # fused, not decomposed
    for shape in [(1, 4, 2, 1, 9, 24), (2, 4, 2, 5, 9, 24), (3, 4, 2, 16, 2, 24)]:
        inputs = attention_inputs(*shape, seed=2)
        mask = dense_mask(inputs[3], inputs[4], shape[4])
        feeds = dict(zip(("q", "k", "v", "mask"), (t.numpy() for t in (*inputs[:3], mask)),
                         strict=True))
        got = session.run(None, feeds)[0]
        np.testing.assert_allclose(got, dense_sdpa(*inputs, scale=0.3).numpy(), atol=2e-6)


@pytest.mark.parametrize("committed", [0, 5, 64, 70])
def test_compact_mask_is_exact_for_runtime_masks(committed):
    """The runtime's verify inputs (block-allocated cache, tree of 9) compact losslessly."""
    cache = KVCache(1, 1, 4, "float32", max_seq=256)
    cache.commit(np.zeros((1, 2, 1, 1, committed, 4), np.float32), np.arange(committed))
    tree = tree_from_parents([-1, 0, 0, 1, 1, 2, 3, 3, 6])
    _, _, past, mask = tree_inputs(cache, Draft(np.arange(9), tree))
    mask = torch.from_numpy(mask)
    slots = past.shape[4]
    assert past_lengths(mask).tolist() == [committed]
    assert torch.equal(tree_part(mask)[0], torch.from_numpy(tree.ancestor_mask))
    assert torch.equal(dense_mask(past_lengths(mask), tree_part(mask), slots), mask)
