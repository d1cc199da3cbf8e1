"""Triton kernel for ``leapc::kv_commit``: copy the accepted rows of a step's new keys and
values into the cache.

Semantics: `leapc.kernels.reference.kv_commit` (the ground truth). For every accepted
entry ``rows[b, j] >= 0``::

    cache[:, :, b, :, start[b] + j] = present[:, :, b, :, rows[b, j]]

The maths is a gather-scatter: no arithmetic, only addresses. A *plane* is one (layer,
K or V, KV head) triple; there are ``P = L * 2 * Hkv`` of them, and each accepted entry
copies one head-dim vector per plane. One program copies entry (b, j) for ``BLOCK_P``
planes at once: a ``[BLOCK_P, D]`` tile whose addresses differ from the source's only in
the slot index (``rows[b, j]`` in present, ``start[b] + j`` in the cache). Padding
entries (-1) copy nothing; the head dim is padded to a power of two with masked accesses.
Entries touch disjoint cache slots, so programs need no synchronisation, as long as
``present`` does not overlap ``cache`` (the op's contract).

Tested against the reference under ``TRITON_INTERPRET=1`` on CPU tensors
(tests/kernels/test_triton_kv_commit.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leapc.kernels import reference
from leapc.kernels.kv_commit import check_shapes

PLANES_PER_PROGRAM = 16


@triton.jit
def _kv_commit_kernel(
    cache_ptr, present_ptr, rows_ptr, start_ptr,
    stride_c0, stride_c1, stride_cb, stride_ch, stride_cs, stride_cd,
    stride_p0, stride_p1, stride_pb, stride_ph, stride_pn, stride_pd,
    stride_rb, stride_rj,
    planes, kv_heads, head_dim,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    entry, plane_block = tl.program_id(0), tl.program_id(2)
    batch = tl.program_id(1).to(tl.int64)
    node = tl.load(rows_ptr + batch * stride_rb + entry * stride_rj)
    slot = tl.load(start_ptr + batch) + entry

    # Plane p is (layer, kind, head) with p = (layer * 2 + kind) * Hkv + head. int64:
    # layer * stride_c0 passes 2^31 once the cache does (4 GiB in half precision).
    plane = (plane_block * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    layer, kind, head = plane // (2 * kv_heads), (plane // kv_heads) % 2, plane % kv_heads
    dims = tl.arange(0, BLOCK_D)
    copied_planes = tl.where(node >= 0, planes, 0)  # -1, padding after the path: none
    copy = (plane < copied_planes)[:, None] & (dims < head_dim)[None, :]

    source = (present_ptr + layer[:, None] * stride_p0 + kind[:, None] * stride_p1
              + batch * stride_pb + head[:, None] * stride_ph + node * stride_pn
              + dims[None, :] * stride_pd)
    target = (cache_ptr + layer[:, None] * stride_c0 + kind[:, None] * stride_c1
              + batch * stride_cb + head[:, None] * stride_ch + slot * stride_cs
              + dims[None, :] * stride_cd)
    tl.store(target, tl.load(source, mask=copy), mask=copy)


def kv_commit(cache: torch.Tensor, present: torch.Tensor, rows: torch.Tensor,
              start: torch.Tensor) -> None:
    """Launch the kernel: same arguments and effect as the reference (the cache, in place).

    The indices are checked on the host first (`reference.check_commit`): the kernel itself
    would write out of bounds silently.
    """
    check_shapes(cache, present, rows, start)
    reference.check_commit(cache, present, rows, start)
    if rows.numel() == 0:
        return
    layers, _, batch, kv_heads, _, head_dim = cache.shape
    planes = layers * 2 * kv_heads
    grid = (rows.shape[1], batch, triton.cdiv(planes, PLANES_PER_PROGRAM))
    _kv_commit_kernel[grid](
        cache, present, rows, start,
        *cache.stride(), *present.stride(), *rows.stride(),
        planes, kv_heads, head_dim,
        BLOCK_P=PLANES_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(head_dim),
    )
