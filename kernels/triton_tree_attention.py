"""Triton kernel for ``leapc::tree_attention``: N tree nodes attend to a prefix-valid cache
plus each other, in one pass over the keys (FlashAttention-style online softmax).

Semantics: `leapc.kernels.reference.tree_attention` (the ground truth). Node n of row b,
query head h, sees cache slot ``j < past_len[b]`` and tree node ``i`` iff
``tree_mask[b, n, i]``; it reads KV head ``h // G`` (grouped-query attention).

The maths. For one query row q and its visible keys ``k_j`` with values ``v_j``::

    out = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m),    s_j = scale * q . k_j

for any constant m; m = max_j s_j keeps every exponent <= 0 (no overflow). The keys come
in blocks, so the kernel keeps, per row, the running maximum ``m``, the running
denominator ``l = sum exp(s_j - m)`` and the running numerator ``acc = sum exp(s_j - m)
v_j`` over the blocks seen so far. A new block with maximum ``m_b`` raises the maximum to
``m' = max(m, m_b)``; the old sums were taken relative to ``m``, so both are rescaled by
``alpha = exp(m - m')`` before the block's own terms ``exp(s_j - m')`` are added. After
the last block ``acc / l`` is the exact softmax average: every term ends up relative to
the same final maximum. Exponentials are base 2 (``exp(x) = 2^(x log2 e)``, folded into
the score scale): the hardware's native ``exp2``. A soft cap (Gemma 2) bounds each score
first, ``s -> cap * tanh(s / cap)``: then ``1 / cap`` goes into the scale and
``cap * log2 e`` multiplies the tanh.

Layout of the work. One program serves one KV head of one batch row and a block of
``BLOCK_M`` query rows drawn from the G query heads sharing that KV head: row r is node
``r % N`` of query head ``kv_head * G + r // N`` (the reference's ``[B, Hkv, G * N, D]``
view). Each key/value block is then loaded once for all G heads, which is what makes
decoding (N = 1) efficient under GQA. The program walks first the valid cache slots
(``past_len[b]`` of them, in ``BLOCK_T`` blocks: invalid slots are never read, so they
may hold anything, even NaN), then the N tree nodes under the ancestor mask.

Head dims need not be powers of two: the D (and Dv) axes are padded to the next power of
two with masked loads (zeros add nothing to a dot product) and masked stores.

Tested against the reference under ``TRITON_INTERPRET=1`` on CPU tensors
(tests/kernels/test_triton_tree_attention.py); timed against it on CUDA by
bench/bench_kernels.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from leapc.ir.errors import UnsupportedModelError
from leapc.kernels.tree_attention import check_shapes

# tl.dot needs every block dimension >= 16.
MIN_BLOCK = 16


@triton.jit
def _tanh(x):
    """1 - 2 / (e^2x + 1): e^2x overflowing to inf gives 1, underflowing to 0 gives -1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _attend_block(acc, row_max, row_sum, q, k_block, v_block, visible, score_scale, cap_log2,
                  SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one block of keys into the running softmax of each query row.

    ``q [M, D]``, ``k_block [D, T]`` (transposed), ``v_block [T, Dv]``, ``visible [M, T]``.
    Returns the updated ``acc [M, Dv]``, ``row_max [M]`` and ``row_sum [M]`` (base 2).
    """
    scores = tl.dot(q, k_block, input_precision=DOT_PRECISION) * score_scale
    if SOFTCAP:
        scores = cap_log2 * _tanh(scores)
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    # A row that has seen no visible key yet has max -inf; subtracting 0 instead keeps its
    # exponentials at exactly 0 where -inf - (-inf) would make them NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    weights = tl.exp2(scores - shift[:, None])
    alpha = tl.exp2(row_max - shift)  # rescales the sums taken relative to the old max
    row_sum = row_sum * alpha + tl.sum(weights, axis=1)
    acc = acc * alpha[:, None] + tl.dot(weights.to(v_block.dtype), v_block,
                                        input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, past_len_ptr, tree_mask_ptr, out_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_mb, stride_mn, stride_mi,
    stride_ob, stride_oh, stride_on, stride_od,
    score_scale, cap_log2, new, past, group, head_dim, value_dim,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # int64: batch * stride_kb passes 2^31 once one layer's keys do (4 GiB in half).
    row_block = tl.program_id(0)
    kv_head, batch = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)

    # This program's query rows: (query head, node) pairs of the KV head's group.
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < group * new
    node = rows % new
    head = kv_head * group + rows // new
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    dim_valid, value_dim_valid = dims < head_dim, value_dims < value_dim

    q = tl.load(q_ptr + batch * stride_qb + head[:, None] * stride_qh
                + node[:, None] * stride_qn + dims[None, :] * stride_qd,
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # The cache: slots 0 .. past_len - 1, visible to every node of this row.
    valid_slots = tl.load(past_len_ptr + batch)
    for start in range(0, valid_slots, BLOCK_T):
        keys = start + tl.arange(0, BLOCK_T)
        key_valid = keys < valid_slots
        k_block = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None] * stride_kd,
                          mask=key_valid[None, :] & dim_valid[:, None], other=0.0)
        v_block = tl.load(v_base + keys[:, None] * stride_vt + value_dims[None, :] * stride_vd,
                          mask=key_valid[:, None] & value_dim_valid[None, :], other=0.0)
        visible = row_valid[:, None] & key_valid[None, :]
        acc, row_max, row_sum = _attend_block(acc, row_max, row_sum, q, k_block, v_block,
                                              visible, score_scale, cap_log2, SOFTCAP,
                                              DOT_PRECISION)

    # The tree: node i (key past + i) is visible to node n iff tree_mask[b, n, i].
    for start in range(0, new, BLOCK_T):
        tree_nodes = start + tl.arange(0, BLOCK_T)
        in_tree = tree_nodes < new
        keys = past + tree_nodes
        k_block = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None] * stride_kd,
                          mask=in_tree[None, :] & dim_valid[:, None], other=0.0)
        v_block = tl.load(v_base + keys[:, None] * stride_vt + value_dims[None, :] * stride_vd,
                          mask=in_tree[:, None] & value_dim_valid[None, :], other=0.0)
        ancestor = tl.load(tree_mask_ptr + batch * stride_mb + node[:, None] * stride_mn
                           + tree_nodes[None, :] * stride_mi,
                           mask=row_valid[:, None] & in_tree[None, :], other=0)
        acc, row_max, row_sum = _attend_block(acc, row_max, row_sum, q, k_block, v_block,
                                              ancestor != 0, score_scale, cap_log2, SOFTCAP,
                                              DOT_PRECISION)

    # Every real row saw its own node (the diagonal), so its sum is > 0; padding rows saw
    # nothing and are not stored, but dividing them by 1 keeps NaN out of the arithmetic.
    row_sum = tl.where(row_valid, row_sum, 1.0)
    out = acc / row_sum[:, None]
    tl.store(out_ptr + batch * stride_ob + head[:, None] * stride_oh + node[:, None] * stride_on
             + value_dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & value_dim_valid[None, :])


def _block(size: int, cap: int | None = None) -> int:
    """The power-of-two block covering ``size`` (at least `MIN_BLOCK`, at most ``cap``)."""
    block = max(MIN_BLOCK, triton.next_power_of_2(size))
    return min(block, cap) if cap else block


def _dot_precision(dtype: torch.dtype) -> str | None:
    """float32 products in full precision: a GPU's default TF32 keeps 10 mantissa bits,
    enough to move verify logits off the reference's. Half types have one precision (None:
    Triton's default)."""
    return "ieee" if dtype == torch.float32 else None


def _score_factors(scale: float, softcap: float) -> tuple[float, float]:
    """``(score_scale, cap_log2)``: base-2 scores are ``dot * score_scale`` without a cap,
    ``cap_log2 * tanh(dot * score_scale)`` with one."""
    if softcap:
        return scale / softcap, softcap * math.log2(math.e)
    return scale * math.log2(math.e), 0.0


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_len: torch.Tensor,
                   tree_mask: torch.Tensor, scale: float, softcap: float = 0.0,
                   window: int = 0, *, block_m: int = 64, block_t: int = 64) -> torch.Tensor:
    """Launch the kernel: same arguments and result as the reference.

    ``block_m`` caps the query rows per program, ``block_t`` is the keys per block (powers
    of two >= 16); the defaults suit a GPU, tests lower ``block_t`` to cover many blocks.
    """
    check_shapes(q, k, v, past_len, tree_mask)
    if window:
        # A row's window is its last `window` visible keys, a rank this kernel's key blocks
        # do not count; only the width-invariant lowerings (ORT) emit windowed tree attention.
        raise UnsupportedModelError("sliding-window tree attention has no Triton kernel "
                                    "(build with --attention tree or dense)")
    batch, heads, new, head_dim = q.shape
    kv_heads, total, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = heads // kv_heads
    out = q.new_empty(batch, heads, new, value_dim)
    mask = tree_mask.view(torch.uint8)  # same bytes; bool pointers are not portable
    rows_block = _block(group * new, block_m)
    grid = (triton.cdiv(group * new, rows_block), kv_heads, batch)
    _tree_attention_kernel[grid](
        q, k, v, past_len, mask, out,
        *q.stride(), *k.stride(), *v.stride(), *mask.stride(), *out.stride(),
        *_score_factors(scale, softcap), new, total - new, group, head_dim, value_dim,
        BLOCK_M=rows_block, BLOCK_T=block_t, BLOCK_D=_block(head_dim),
        BLOCK_DV=_block(value_dim), SOFTCAP=bool(softcap),
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out
