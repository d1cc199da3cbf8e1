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


def _with_spare_row(rows):
    """``rows`` ``[B, H, M, K]`` with a row of zeros after the last: a GEMM of one row runs
    ONNX Runtime's matrix-vector kernel, whose sums round differently from the GEMM kernel
    that every wider step runs (a one-token step without GQA has one row)."""
    shape = op.Concat(op.Shape(rows, start=0, end=2), op.Constant(value_ints=[1]),
                      op.Shape(rows, start=3, end=4), axis=0)
    return op.Concat(rows, op.Expand(op.CastLike(op.Constant(value_floats=[0.0]), rows), shape),
                     axis=2)


def _without_spare_row(rows):
    return op.Slice(rows, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]),
                    op.Constant(value_ints=[2]))


def _width_invariant_attention(q, k, v, hidden, scale: float):
    """Attention whose every output row is bit-identical however many rows share the step
    and wherever masked keys sit among the visible ones; ``hidden`` is ``[B, 1, 1, N, T + N]``
    float, 0 where a key is visible and -inf where not.

    ONNX Runtime's fused ``Attention`` is not: a row's output moves by ~1e-7 between a
    one-token and a wide step, and with a gap of masked keys (the cache's free slots)
    before the new ones. Float32 greedy decoding rarely notices; int8 weights do, since
    quantizing activations on the fly turns a 1e-7 change into a whole quantization step
    (1e-3..1e-2 on the logits), and verification then emits other tokens than ``ar``.

    Here each row's arithmetic reads its visible keys, in cache order, through operations
    whose per-element order does not depend on the row count or the key length: the scores
    and ``exp`` are per element, and a row's max is exact in any order. The softmax
    denominator, the one reduction whose order a vectorised ``ReduceSum`` ties to the row
    length, comes from an extra all-ones column of ``v``: ``exp(s) @ [v | 1]`` gives the
    numerator and the denominator from one GEMM, which accumulates over keys in order, and
    a masked key adds an exact ``0 * v``.
    Every GEMM has at least two rows (`_with_spare_row`), so all run one kernel.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    batch, new = op.Shape(q, start=0, end=1), op.Shape(q, start=2, end=3)
    total = op.Shape(k, start=2, end=3)
    grouped = op.Concat(batch, op.Constant(value_ints=[kv_heads, -1]), axis=0)
    by_node = op.Concat(batch, op.Constant(value_ints=[kv_heads, heads // kv_heads]), new,
                        total, axis=0)
    grouped_q = op.Reshape(op.Mul(q, op.Constant(value_float=scale)),
                           op.Concat(grouped, op.Shape(q, start=3, end=4), axis=0))
    scores = op.MatMul(_with_spare_row(grouped_q), op.Transpose(k, perm=[0, 1, 3, 2]))
    scores = op.Add(op.Reshape(_without_spare_row(scores), by_node),
                    hidden)  # [B, Hkv, G, N, T + N]
    weights = op.Exp(op.Sub(scores, op.ReduceMax(scores, op.Constant(value_ints=[-1]),
                                                 keepdims=1)))
    ones = op.Expand(op.CastLike(op.Constant(value_floats=[1.0]), v),
                     op.Concat(op.Shape(v, start=0, end=3), op.Constant(value_ints=[1]), axis=0))
    weighted = _without_spare_row(op.MatMul(
        _with_spare_row(op.Reshape(weights, op.Concat(grouped, total, axis=0))),
        op.Concat(v, ones, axis=-1)))  # [B, Hkv, G * N, Dv + 1]
    last = op.Constant(value_ints=[-1])
    numerator = op.Slice(weighted, op.Constant(value_ints=[0]), last, last)
    denominator = op.Slice(weighted, last, op.Constant(value_ints=[2**62]), last)
    return op.Reshape(op.Div(numerator, denominator),
                      op.Concat(batch, op.Constant(value_ints=[heads]), new,
                                op.Constant(value_ints=[-1]), axis=0))


def translations(width_invariant: bool = False) -> dict:
    """The translation table for one export; ``width_invariant`` lowers tree attention with
    `_width_invariant_attention` instead of the fused ``Attention`` node.

    Every layer's tree attention reads the same ``past_len`` and ``tree_mask`` and keys of
    the same symbolic length, so all layers share one mask. Built per layer from the
    layer's own key shape, its dozen small nodes cost the bundled model ~0.3 ms a step
    (6% at a short past), and neither the exporter nor ONNX Runtime can tell that two
    layers' key lengths are equal.
    """
    masks, hidden = {}, {}

    def tree_attention(q, k, v, past_len, tree_mask, scale: float):
        """Query head h reads KV head h // G (GQA without repeating the cache); the
        boolean mask (True: attend) hides exactly the keys the reference sets to -inf;
        every row sees its own diagonal, so none is empty."""
        total = k.shape[2]
        known = isinstance(total, int) or total.value is not None
        key = (past_len, tree_mask, total if known else k)
        if key not in masks:
            masks[key] = _visible_keys(past_len, tree_mask, op.Shape(k, start=2, end=3))
        if not width_invariant:
            out, _, _, _ = op.Attention(q, k, v, masks[key], scale=scale)  # native GQA
            return out
        if key not in hidden:  # shared by the layers, like the mask
            hidden[key] = op.Where(op.Unsqueeze(masks[key], [1]), op.CastLike(0.0, q),
                                   op.CastLike(float("-inf"), q))
        return _width_invariant_attention(q, k, v, hidden[key], scale)

    return {torch.ops.leapc.tree_attention.default: tree_attention}
