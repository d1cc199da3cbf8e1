"""ONNX decompositions of the leapc custom ops, for the dynamo exporter.

``torch.onnx.export(..., custom_translation_table=TRANSLATIONS)`` calls each function with
the op's inputs as ONNX values while it builds the graph; the functions compose standard
ONNX operators only, so any ONNX Runtime build runs the result.
"""

from __future__ import annotations

import torch
from onnxscript import opset20 as op

import leapc.kernels.tree_attention  # noqa: F401  (declares torch.ops.leapc.tree_attention)


def _dim(x, axis: int):
    """``x.shape[axis]`` as a 1-element int64 tensor (a piece for `Concat`-built shapes)."""
    return op.Shape(x, start=axis, end=axis + 1)


def _visible_keys(past_len, tree_mask, past):
    """``[B, N, T + N]`` bool, as `leapc.kernels.reference.visible_keys` computes it."""
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(past, [0]), op.Constant(value_int=1))
    valid_past = op.Less(op.Unsqueeze(slots, [0]), op.Unsqueeze(past_len, [1]))  # [B, T]
    batch_new = op.Shape(tree_mask, start=0, end=2)
    valid_past = op.Expand(op.Unsqueeze(valid_past, [1]), op.Concat(batch_new, past, axis=0))
    return op.Concat(valid_past, tree_mask, axis=-1)


def tree_attention(q, k, v, past_len, tree_mask, scale: float):
    """The reference's computation step by step: queries grouped per KV head (no repeated
    keys or values), masked scores set to -inf, softmax, weighted sum of values."""
    keep, rest = op.Constant(value_ints=[0]), op.Constant(value_ints=[-1])
    new, total = _dim(q, 2), _dim(k, 2)
    grouped_q = op.Reshape(q, op.Concat(keep, _dim(k, 1), rest, _dim(q, 3), axis=0))
    scores = op.Mul(op.MatMul(grouped_q, op.Transpose(k, perm=[0, 1, 3, 2])),
                    op.CastLike(scale, q))  # [B, Hkv, G * N, T + N]
    per_group = op.Reshape(scores, op.Concat(keep, keep, rest, new, total, axis=0))
    visible = op.Unsqueeze(_visible_keys(past_len, tree_mask, op.Sub(total, new)), [1, 2])
    masked = op.Where(visible, per_group, op.CastLike(float("-inf"), q))
    weights = op.Reshape(op.Softmax(masked, axis=-1), op.Concat(keep, keep, rest, total, axis=0))
    out = op.MatMul(weights, v)  # [B, Hkv, G * N, Dv]
    return op.Reshape(out, op.Concat(op.Shape(q, start=0, end=3), _dim(v, 3), axis=0))


TRANSLATIONS = {torch.ops.leapc.tree_attention.default: tree_attention}
