"""ONNX translations of the leapc custom ops, for the dynamo exporter.

``torch.onnx.export(..., opset_version=OPSET, custom_translation_table=translations())``
calls each function with the op's inputs as ONNX values while it builds the graph; the
functions compose standard ONNX operators only, so any ONNX Runtime build runs the result.
"""

from __future__ import annotations

import torch
from onnxscript import opset23 as op

import leapc.kernels.tree_attention  # noqa: F401  (declares torch.ops.leapc.tree_attention)

# Opset 23 has fused Attention (native GQA, boolean mask), RMSNormalization and
# RotaryEmbedding, which the exporter emits for the whole step program.
OPSET = 23


def _visible_keys(past_len, tree_mask, total):
    """``[B, 1, N, T + N]`` bool, as `leapc.kernels.reference.visible_keys` computes it
    (with a head axis); ``total`` is ``T + N`` as a 1-element tensor."""
    new = op.Shape(tree_mask, start=1, end=2)
    past = op.Sub(total, new)
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(past, [0]), op.Constant(value_int=1))
    valid_past = op.Less(slots, op.Unsqueeze(past_len, [1, 2, 3]))  # [B, 1, 1, T]
    batch = op.Shape(tree_mask, start=0, end=1)
    valid_past = op.Expand(valid_past, op.Concat(batch, op.Constant(value_ints=[1]), new, past,
                                                 axis=0))
    return op.Concat(valid_past, op.Unsqueeze(tree_mask, [1]), axis=-1)


def translations() -> dict:
    """The translation table for one export.

    Every layer's tree attention reads the same ``past_len`` and ``tree_mask`` and keys of
    the same symbolic length, so all layers share one mask. Built per layer from the
    layer's own key shape, its dozen small nodes cost the bundled model ~0.3 ms a step
    (6% at a short past), and neither the exporter nor ONNX Runtime can tell that two
    layers' key lengths are equal.
    """
    masks = {}

    def tree_attention(q, k, v, past_len, tree_mask, scale: float):
        """One `Attention` node: query head h reads KV head h // G natively (4-D inputs
        with fewer KV heads), and the boolean mask (True: attend) hides exactly the keys
        the reference sets to -inf; every row sees its own diagonal, so none is empty."""
        total = k.shape[2]
        known = isinstance(total, int) or total.value is not None
        key = (past_len, tree_mask, total if known else k)
        if key not in masks:
            masks[key] = _visible_keys(past_len, tree_mask, op.Shape(k, start=2, end=3))
        out, _, _, _ = op.Attention(q, k, v, masks[key], scale=scale)
        return out

    return {torch.ops.leapc.tree_attention.default: tree_attention}
