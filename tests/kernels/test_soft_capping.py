"""Attention logit soft-capping (Gemma 2): ``leapc.capped_attention`` (the dense op capture
emits) and ``leapc.tree_attention``'s ``softcap`` against transformers' own Gemma 2
attention, and every ONNX lowering of both against the reference in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_tree_attention import attention_inputs
from torch.export import Dim
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
from trees import dense_mask

from leapc.ir.capped_attention import capped_sdpa
from leapc.kernels import reference
from leapc.kernels.onnx_translations import OPSET, translations
from leapc.kernels.tree_attention import past_lengths, tree_part
from leapc.runtime.backends.aoti import fused_sdpa
from leapc.runtime.backends.ort import session_options
from leapc.runtime.manifest import Attention

SCALE, CAP = 0.3, 1.5  # scores of these random inputs reach well past the cap


class _Layer(torch.nn.Module):
    """What transformers' eager attention reads from its module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.eval()


def additive_mask(q, k, past_len, tree_mask):
    """``[B, 1, N, T + N]``: the capture's additive form of the dense step mask."""
    visible = dense_mask(past_len, tree_mask, k.shape[2] - q.shape[2])[:, None]
    return torch.where(visible, 0.0, torch.finfo(q.dtype).min)


def gemma2_attention(q, k, v, past_len, tree_mask, softcap):
    """transformers' Gemma 2 eager attention under the dense mask: the ground truth."""
    out, _ = eager_attention_forward(_Layer(q.shape[1] // k.shape[1]), q, k, v,
                                     additive_mask(q, k, past_len, tree_mask), scaling=SCALE,
                                     softcap=softcap)
    return out.transpose(1, 2)


@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 9, 24), (1, 8, 2, 1, 7, 16)], ids=str)
def test_both_ops_compute_gemma2_attention(shape):
    inputs = attention_inputs(*shape)
    q, k, v, past_len, tree_mask = inputs
    want = gemma2_attention(*inputs, CAP)
    assert (want - gemma2_attention(*inputs, None)).abs().max() > 0.05  # the cap bites
    torch.testing.assert_close(reference.tree_attention(*inputs, SCALE, CAP), want)
    torch.testing.assert_close(torch.ops.leapc.tree_attention(*inputs, SCALE, CAP), want)
    capped = torch.ops.leapc.capped_attention(q, k, v, additive_mask(q, k, past_len, tree_mask),
                                              SCALE, CAP)
    torch.testing.assert_close(capped, want)


def test_aoti_decomposition_keeps_the_cap():
    inputs = attention_inputs(2, 4, 2, 5, 9, 24)
    torch.testing.assert_close(fused_sdpa(*inputs, SCALE, CAP),
                               reference.tree_attention(*inputs, SCALE, CAP))


class _Tree(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.ops.leapc.tree_attention(q, k, v, past_lengths(mask), tree_part(mask), SCALE,
                                              CAP)


class _Dense(torch.nn.Module):
    def forward(self, q, k, v, mask):
        additive = torch.where(mask, 0.0, torch.finfo(q.dtype).min)[:, None]
        return torch.ops.leapc.capped_attention(q, k, v, additive, SCALE, CAP)


def _export(module: torch.nn.Module, attention: Attention, path) -> list:
    """Export ``module`` to ONNX at ``path`` with ``attention``'s translation; its nodes."""
    q, k, v, past_len, tree_mask = attention_inputs(2, 4, 2, 3, 5, 24)
    b, n = Dim("B", min=1, max=8), Dim("N", min=1, max=32)
    kv = {0: b, 2: Dim.AUTO}
    program = torch.export.export(
        module, (q, k, v, dense_mask(past_len, tree_mask, 5)),
        dynamic_shapes={"q": {0: b, 2: n}, "k": kv, "v": kv, "mask": {0: b, 1: n, 2: Dim.AUTO}})
    torch.onnx.export(program, dynamo=True, opset_version=OPSET, verbose=False,
                      custom_translation_table=translations(attention)).save(str(path))
    return list(onnx.load(str(path)).graph.node)


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize(("module", "attention", "capped_node"), [
    (_Tree(), Attention.TREE, "Attention"),
    (_Tree(), Attention.INVARIANT, "Tanh"),
    (_Dense(), Attention.TREE, "Attention"),
], ids=["tree", "invariant", "dense"])
def test_onnx_lowerings_keep_the_cap(tmp_path, module, attention, capped_node):
    path = tmp_path / "attention.onnx"
    nodes = _export(module, attention, path)
    if capped_node == "Attention":
        (node,) = [n for n in nodes if n.op_type == "Attention"]
        assert _attributes(node)["softcap"] == pytest.approx(CAP)
    else:
        assert [n.op_type for n in nodes].count("Tanh") == 1
    session = ort.InferenceSession(str(path), session_options(),
                                   providers=["CPUExecutionProvider"])
    for shape in [(1, 4, 2, 1, 9, 24), (3, 4, 2, 16, 2, 24)]:
        q, k, v, past_len, tree_mask = attention_inputs(*shape, seed=2)
        feeds = dict(q=q, k=k, v=v, mask=dense_mask(past_len, tree_mask, shape[4]))
        got = session.run(None, {name: t.numpy() for name, t in feeds.items()})[0]
        want = reference.tree_attention(q, k, v, past_len, tree_mask, SCALE, CAP)
        np.testing.assert_allclose(got, want.numpy(), atol=2e-6)


def test_the_kernel_lowering_writes_the_cap(tmp_path):
    """leapc's ``TreeAttention`` node carries it (its kernel: test_tree_attention_kernel.py)."""
    (node,) = [n for n in _export(_Tree(), Attention.KERNEL, tmp_path / "kernel.onnx")
               if n.op_type == "TreeAttention"]
    assert _attributes(node)["softcap"] == pytest.approx(CAP)


def test_capped_sdpa_is_the_ops_definition():
    """AOTInductor compiles `capped_sdpa` in place of the op: it must be the op."""
    q, k, v, past_len, tree_mask = attention_inputs(2, 4, 2, 5, 9, 24)
    mask = additive_mask(q, k, past_len, tree_mask)
    torch.testing.assert_close(capped_sdpa(q, k, v, mask, SCALE, CAP),
                               torch.ops.leapc.capped_attention(q, k, v, mask, SCALE, CAP))
