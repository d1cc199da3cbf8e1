"""ONNX translations of the leapc custom ops, for the dynamo exporter.

``torch.onnx.export(..., opset_version=OPSET, custom_translation_table=translations())``
calls each function with the op's inputs as ONNX values while it builds the graph; the
functions compose standard ONNX operators only, so any ONNX Runtime build runs the result.
"""

from __future__ import annotations

import torch
from onnxscript import opset23 as op
from onnxscript.values import Op, Opset

import leapc.kernels.tree_attention  # noqa: F401  (declares torch.ops.leapc.tree_attention)
from leapc.kernels.ort_ops import DOMAIN
from leapc.runtime.manifest import Attention


def _tree_attention_schema():
    """The signature of ``ai.leapc::TreeAttention`` (kernels/native/ort_ops.c), which
    onnxscript needs to build the node: inputs in order, the scale, optional cap and window."""
    from onnx.defs import OpSchema

    floats = ("q", "k_past", "k_new", "v_past", "v_new")
    inputs = [OpSchema.FormalParameter(name, "tensor(float)") for name in floats]
    inputs += [OpSchema.FormalParameter("past_len", "tensor(int64)"),
               OpSchema.FormalParameter("tree_mask", "tensor(bool)")]
    return OpSchema(
        "TreeAttention", DOMAIN, 1, inputs=inputs,
        outputs=[OpSchema.FormalParameter("out", "tensor(float)")],
        attributes=[OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "scores' factor"),
                    OpSchema.Attribute("softcap", OpSchema.AttrType.FLOAT,
                                       "scores' soft cap (0 or absent: none)", required=False),
                    OpSchema.Attribute("window", OpSchema.AttrType.INT,
                                       "keys each row sees, the last of its visible ones "
                                       "(0 or absent: all)", required=False)])


_leapc_ops = Opset(DOMAIN, 1)  # leapc's ONNX Runtime ops (`leapc.kernels.ort_ops`)
_tree_attention_op = Op(_leapc_ops, "TreeAttention", _tree_attention_schema())

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


def _within_window(visible, window: int):
    """``visible`` narrowed to each row's last ``window`` visible keys, as
    `leapc.kernels.reference.within_window`: a key is kept while fewer than ``window``
    visible keys follow it, itself included."""
    seen = op.CumSum(op.Cast(visible, to=7), op.Constant(value_int=-1))  # int64, inclusive
    count = op.ReduceMax(seen, op.Constant(value_ints=[-1]), keepdims=1)
    return op.And(visible, op.Less(op.Sub(count, seen), op.Constant(value_int=window)))


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


def _width_invariant_attention(q, k, v, hidden, ones, scale: float, softcap: float):
    """Attention whose every output row is bit-identical however many rows share the step
    and wherever masked keys sit among the visible ones. ``hidden`` is ``[B, 1, G * N,
    T + N]`` float, 0 where a key is visible and -inf where not (query row ``g * N + n`` is
    node ``n``); ``ones`` is ``[B, Hkv, T + N, 2]``. Both are the same for every layer.

    ONNX Runtime's fused ``Attention`` is not: a row's output moves by ~1e-7 between a
    one-token and a wide step, and with a gap of masked keys (the cache's free slots)
    before the new ones. Float32 greedy decoding rarely notices; int8 weights do, since
    quantizing activations on the fly turns a 1e-7 change into a whole quantization step
    (1e-3..1e-2 on the logits), and verification then emits other tokens than ``ar``.

    Here each row's arithmetic reads its visible keys, in cache order, through operations
    whose per-element order does not depend on the row count or the key length: the scores
    and ``exp`` are per element, and a row's max is exact in any order. The softmax
    denominator, the one reduction whose order a vectorised ``ReduceSum`` ties to the row
    length, is a GEMM with all-ones columns like the numerator ``exp(s) @ v``: a GEMM
    accumulates over keys one by one, in cache order, while they fit one of its blocks
    (`_weighted_values`), and a masked key adds an exact ``0 * v``. With GQA every GEMM has ``G * N >= 2`` rows; without it (G = 1) a spare
    row keeps one-token steps off the matrix-vector kernel (`_with_spare_row`).

    Every reshape is by constants (``0`` copies a dimension, ``-1`` infers it): per-layer
    shape arithmetic cost more than the attention itself at short pasts. The soft cap
    (if any) is per element, so it keeps every property above.
    """
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    grouped_q = op.Reshape(op.Mul(q, op.Constant(value_float=scale)),
                           op.Constant(value_ints=[0, kv_heads, -1, head_dim]))
    spare = heads == kv_heads  # G = 1: a one-token step has one row
    if spare:
        grouped_q = _with_spare_row(grouped_q)
    scores = op.MatMul(grouped_q, op.Transpose(k, perm=[0, 1, 3, 2]))
    if spare:
        scores = _without_spare_row(scores)
    if softcap:
        scores = op.Mul(op.Tanh(op.Div(scores, op.Constant(value_float=softcap))),
                        op.Constant(value_float=softcap))
    scores = op.Add(scores, hidden)  # [B, Hkv, G * N, T + N]
    weights = op.Exp(op.Sub(scores, op.ReduceMax(scores, op.Constant(value_ints=[-1]),
                                                 keepdims=1)))
    if spare:
        weights = _with_spare_row(weights)
    numerator, denominator = _weighted_values(weights, v, ones)  # [B, Hkv, G * N, Dv | 1]
    if spare:
        numerator, denominator = _without_spare_row(numerator), _without_spare_row(denominator)
    return op.Reshape(op.Div(numerator, denominator),
                      op.Constant(value_ints=[0, heads, -1, v.shape[3]]))


def _weighted_values(weights, v, ones):
    """``(weights @ v, weights @ 1)`` as GEMMs of at most 16 columns each.

    MLAS, ONNX Runtime's CPU GEMM, sums over K in blocks and then adds the blocks' sums;
    a block holds ``128 * 128 / S`` keys, ``S`` the column count rounded up to a power of
    two, 16 at least. One GEMM of ``[v | 1]`` (33 columns on the bundled model) has blocks
    of 256 keys, and a step's drafted keys, placed after the cache's free slots and their
    tree siblings, fall into other blocks than the same keys in `ar`'s steps: the sums
    group differently. At 16 columns or fewer a block is 1024 keys (`INVARIANT_MAX_KEYS`),
    the whole row of any step of an engine up to that length. ``ones`` has two columns: a
    one-column GEMM runs the matrix-vector kernel (`_with_spare_row`)."""
    dv = v.shape[3]
    chunks = -(-dv // 16)
    width = -(-dv // chunks)
    last = op.Constant(value_ints=[-1])
    parts = [v] if chunks == 1 else [
        op.Slice(v, op.Constant(value_ints=[start]), op.Constant(value_ints=[start + width]),
                 last) for start in range(0, dv, width)]
    products = [op.MatMul(weights, part) for part in parts]
    numerator = products[0] if chunks == 1 else op.Concat(*products, axis=-1)
    denominator = op.Slice(op.MatMul(weights, ones), op.Constant(value_ints=[0]),
                           op.Constant(value_ints=[1]), last)
    return numerator, denominator


def _hidden_keys(visible, groups: int, like):
    """``[B, 1, G * N, T + N]``: 0 where ``visible`` (``[B, 1, N, T + N]``) is True, -inf
    elsewhere, repeated for the ``G`` query heads of a KV head (rows ``g * N + n``)."""
    hidden = op.Where(visible, op.CastLike(0.0, like), op.CastLike(float("-inf"), like))
    return op.Tile(hidden, op.Constant(value_ints=[1, 1, groups, 1]))


def _ones_columns(v):
    """``[B, Hkv, T + N, 2]`` ones, whose product with the weights is the softmax
    denominator (twice: `_weighted_values`)."""
    return op.Expand(op.CastLike(op.Constant(value_floats=[1.0]), v),
                     op.Concat(op.Shape(v, start=0, end=3), op.Constant(value_ints=[2]), axis=0))


def _cache_and_new(keys, new):
    """``keys [B, Hkv, T + N, D]`` as the cache ``[.., T, D]`` and the step's own
    ``[.., N, D]``: the inputs of the model's ``cat`` when it made them (then that copy of
    the cache goes unused and the exporter drops it), else two slices."""
    producer = keys.producer()
    if (producer is not None and producer.op_type == "Concat" and len(producer.inputs) == 2
            and producer.attributes["axis"].value in (2, -2)):
        return producer.inputs[0], producer.inputs[1]
    total = op.Shape(keys, start=2, end=3)
    past = op.Sub(total, new)
    two = op.Constant(value_ints=[2])
    return (op.Slice(keys, op.Constant(value_ints=[0]), past, two),
            op.Slice(keys, past, total, two))


def _kernel_attention(q, k, v, past_len, tree_mask, scale: float, softcap: float,
                      window: int):
    """leapc's ``TreeAttention`` kernel (kernels/native/tree_attention.c): width-invariant
    by construction at any length, reading the cache where it is."""
    new = op.Shape(tree_mask, start=1, end=2)
    return _tree_attention_op(q, *_cache_and_new(k, new), *_cache_and_new(v, new),
                              past_len, tree_mask, scale=scale,
                              **_set(softcap=softcap, window=window))


def _set(**optional) -> dict:
    """The optional attributes that are set (0: none): nodes of programs without a cap or
    a window stay as they were."""
    return {name: value for name, value in optional.items() if value}


def translations(attention: Attention = Attention.TREE) -> dict:
    """The translation table for one export: tree attention as the fused ``Attention``
    node (``TREE``), `_width_invariant_attention` (``INVARIANT``) or leapc's kernel
    (``KERNEL``).

    Every layer's tree attention reads the same ``past_len`` and ``tree_mask`` and keys of
    the same symbolic length, so all layers share one mask. Built per layer from the
    layer's own key shape, its dozen small nodes cost the bundled model ~0.3 ms a step
    (6% at a short past), and neither the exporter nor ONNX Runtime can tell that two
    layers' key lengths are equal.
    """
    masks, shared = {}, {}

    def tree_attention(q, k, v, past_len, tree_mask, scale: float, softcap: float = 0.0,
                       window: int = 0):
        """Query head h reads KV head h // G (GQA without repeating the cache); the
        boolean mask (True: attend) hides exactly the keys the reference sets to -inf,
        those outside a sliding window included; every row sees its own diagonal, so none
        is empty. ``Attention`` soft-caps before the mask, as the reference does (ONNX's
        ``softcap``, 0: none)."""
        if attention is Attention.KERNEL:
            return _kernel_attention(q, k, v, past_len, tree_mask, scale, softcap, window)
        total = k.shape[2]
        known = isinstance(total, int) or total.value is not None
        key = (past_len, tree_mask, total if known else k, window)
        if key not in masks:
            visible = _visible_keys(past_len, tree_mask, op.Shape(k, start=2, end=3))
            masks[key] = _within_window(visible, window) if window else visible
        if attention is not Attention.INVARIANT:
            out, _, _, _ = op.Attention(q, k, v, masks[key], scale=scale, **_set(softcap=softcap))
            return out
        if key not in shared:  # shared by the layers, like the mask
            shared[key] = (_hidden_keys(masks[key], q.shape[1] // k.shape[1], q),
                           _ones_columns(v))
        return _width_invariant_attention(q, k, v, *shared[key], scale, softcap)

    return {torch.ops.leapc.tree_attention.default: tree_attention,
            torch.ops.leapc.capped_attention.default: capped_attention}


def capped_attention(query, key, value, attn_mask, scale: float, softcap: float):
    """`leapc.capped_attention` as one ``Attention`` node: native GQA, the additive mask
    added after the cap (ONNX's order, and the op's)."""
    out, _, _, _ = op.Attention(query, key, value, attn_mask, scale=scale, **_set(softcap=softcap))
    return out
