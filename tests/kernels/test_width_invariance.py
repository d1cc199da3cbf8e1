"""Width-invariant tree attention (``translations(Attention.INVARIANT)``, and leapc's kernel,
``translations(Attention.KERNEL)``): every row of a step is bit-identical to the same
token's row in a one-token step, whatever the step's width, tree shape and free cache slots
between the past and the new tokens.

This is what lets int8 engines verify drafts: their activations are quantized on the fly,
so a rounding-level difference between widths becomes a different token."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_tree_attention import CompactMaskAttention, attention_inputs, dense_sdpa
from torch.export import Dim
from trees import dense_mask, random_tree, stack_masks

from leapc.kernels.onnx_translations import OPSET, translations
from leapc.kernels.ort_ops import compile_library
from leapc.runtime.backends.ort import session_options
from leapc.runtime.manifest import Attention

INVARIANT = [Attention.INVARIANT, pytest.param(Attention.KERNEL, marks=pytest.mark.skipif(
    "avx512_vnni" not in open("/proc/cpuinfo").read(), reason="leapc's ops need AVX512-VNNI"))]


def export_attention(tmp_path, heads: int, kv_heads: int, attention: Attention,
                     module: torch.nn.Module = CompactMaskAttention()):
    """``module(q, k, v, mask)`` exported with ``attention``'s translation: an ORT session
    and the model."""
    q, k, v, past_len, tree_mask = attention_inputs(2, heads, kv_heads, 3, 5, 32)
    b, n = Dim("B", min=1, max=8), Dim("N", min=1, max=32)
    kv = {0: b, 2: Dim.AUTO}
    program = torch.export.export(
        module, (q, k, v, dense_mask(past_len, tree_mask, 5)),
        dynamic_shapes={"q": {0: b, 2: n}, "k": kv, "v": kv, "mask": {0: b, 1: n, 2: Dim.AUTO}})
    path = tmp_path / f"{type(module).__name__}-{heads}-{kv_heads}-{attention.value}.onnx"
    torch.onnx.export(program, dynamo=True, opset_version=OPSET, verbose=False,
                      custom_translation_table=translations(attention)).save(str(path))
    options = session_options()
    if attention is Attention.KERNEL:
        options.register_custom_ops_library(str(compile_library(path.with_suffix(".so"))))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, onnx.load(str(path))


def run(session, q, k, v, mask) -> np.ndarray:
    feeds = dict(zip(("q", "k", "v", "mask"), (np.ascontiguousarray(t) for t in (q, k, v, mask)),
                     strict=True))
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("attention", INVARIANT, ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 3), (10, 2)], ids=str)
def test_matches_the_reference_without_the_fused_node(tmp_path, heads, kv_heads, attention):
    session, model = export_attention(tmp_path, heads, kv_heads, attention)
    ops = {n.op_type for n in model.graph.node}
    assert "Attention" not in ops
    assert ("TreeAttention" in ops) is (attention is Attention.KERNEL)
    for shape in [(1, heads, kv_heads, 1, 9, 32), (2, heads, kv_heads, 7, 40, 32)]:
        inputs = attention_inputs(*shape, seed=3)
        mask = dense_mask(inputs[3], inputs[4], shape[4])
        got = run(session, *(t.numpy() for t in inputs[:3]), mask.numpy())
        np.testing.assert_allclose(got, dense_sdpa(*inputs, scale=0.3).numpy(), atol=2e-6)


def one_token_rows(session, q, k, v, past_len: int, tree_mask) -> np.ndarray:
    """Each node's row computed alone, as ``ar`` would: its keys are the valid past and its
    ancestors, contiguous and in order, with no free slot anywhere."""
    past = k.shape[2] - q.shape[2]
    rows = []
    for node in range(q.shape[2]):
        keys = list(range(past_len)) + [past + a for a in np.flatnonzero(tree_mask[node])]
        mask = np.ones((1, 1, len(keys)), dtype=bool)
        rows.append(run(session, q[:, :, node : node + 1], k[:, :, keys], v[:, :, keys], mask))
    return np.concatenate(rows, axis=2)


@pytest.mark.parametrize("attention", INVARIANT, ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (10, 2)], ids=str)
@pytest.mark.parametrize("past_len,slots", [(1, 64), (37, 64), (300, 320)])
def test_a_wide_tree_step_equals_one_token_steps_bit_for_bit(tmp_path, heads, kv_heads,
                                                             past_len, slots, attention):
    session, _ = export_attention(tmp_path, heads, kv_heads, attention)
    g = torch.Generator().manual_seed(past_len)
    nodes = 12
    tree = random_tree(nodes, g)
    tree_mask = stack_masks([tree])
    q = torch.randn(1, heads, nodes, 32, generator=g).numpy()
    k, v = (torch.randn(1, kv_heads, slots + nodes, 32, generator=g).numpy() for _ in range(2))
    mask = dense_mask(torch.tensor([past_len]), tree_mask, slots).numpy()
    wide = run(session, q, k, v, mask)
    alone = one_token_rows(session, q, k, v, past_len, tree_mask[0].numpy())
    assert np.array_equal(wide, alone)


def test_the_fused_node_is_not_width_invariant(tmp_path):
    """Why the decomposition exists: the same comparison fails on ``Attention``."""
    session, model = export_attention(tmp_path, 10, 2, Attention.TREE)
    assert "Attention" in {n.op_type for n in model.graph.node}
    g = torch.Generator().manual_seed(0)
    tree_mask = stack_masks([random_tree(12, g)])
    q = torch.randn(1, 10, 12, 32, generator=g).numpy()
    k, v = (torch.randn(1, 2, 64 + 12, 32, generator=g).numpy() for _ in range(2))
    wide = run(session, q, k, v, dense_mask(torch.tensor([37]), tree_mask, 64).numpy())
    assert not np.array_equal(wide, one_token_rows(session, q, k, v, 37, tree_mask[0].numpy()))
