"""int8 x int8 GEMM for small M: the weight layout of `native/q8_gemm.c` and its exact
reference.

A verify step multiplies N = 1..32 token rows by every weight matrix. ONNX Runtime's
`MatMulNBits` costs ~M times its one-row time for M rows (bundled model, 320 x 1728 int8:
13.8 us at M = 1, 48.9 us at M = 8, two threads), so a step of 8 tokens cost ~2x a step of
one. The C kernel reads each 64-byte group of weights once for up to four rows and
two column tiles, and sums every output in one fixed order, so a row's result does not
depend on M (see the C file).

`pack_weights` quantizes a float matrix into the kernel's layout; `reference` computes
what the kernel computes, operation for operation in float32, so tests can compare bit
for bit.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # inputs per scale: weights per column, activations per row
TILE = 16  # output columns per 512-bit register


def supports(k: int, n: int) -> bool:
    """Whether a [k, n] weight fits the kernel's blocking."""
    return k % BLOCK == 0 and n % TILE == 0


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per 32 inputs per column: q [K, N] int8, scales [K/32, N] float32."""
    k, n = w.shape
    blocks = w.astype(np.float32).reshape(k // BLOCK, BLOCK, n)
    amax = np.abs(blocks).max(axis=1)
    scales = (amax / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.clip(np.rint(blocks / safe[:, None, :]), -127, 127).astype(np.int8)
    return q.reshape(k, n), scales


def pack_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> (packed [N/16, K*16] uint8, scales [N/16, K/32*16] float32), the
    layout `q8_gemm_tiles` reads: per 16-column tile, per 4 inputs, 16 x 4 bytes (q + 128)."""
    k, n = w.shape
    if not supports(k, n):
        raise ValueError(f"q8_gemm needs K % {BLOCK} == 0 and N % {TILE} == 0, got {k} x {n}")
    q, scales = quantize_weights(w)
    offset = (q.astype(np.int16) + 128).astype(np.uint8)
    packed = offset.reshape(k // 4, 4, n // TILE, TILE).transpose(2, 0, 3, 1)
    tiled_scales = scales.reshape(k // BLOCK, n // TILE, TILE).transpose(1, 0, 2)
    return (np.ascontiguousarray(packed).reshape(n // TILE, k * TILE),
            np.ascontiguousarray(tiled_scales).reshape(n // TILE, k // BLOCK * TILE))


def unpack_weights(packed: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse layout: q [K, N] int8 and scales [K/32, N]."""
    tiles, k16 = packed.shape
    k, n = k16 // TILE, tiles * TILE
    q = (packed.reshape(tiles, k // 4, TILE, 4).transpose(1, 3, 0, 2).reshape(k, n)
         .astype(np.int16) - 128).astype(np.int8)
    return q, scales.reshape(tiles, k // BLOCK, TILE).transpose(1, 0, 2).reshape(k // BLOCK, n)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations [M, K] -> q int8 [M, K], block sums int32 and scales float32 [M, K/32]."""
    m, k = x.shape
    blocks = x.astype(np.float32).reshape(m, k // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=2)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.clip(np.rint(blocks * inv[:, :, None]), -127, 127).astype(np.int32)
    return (q.reshape(m, k).astype(np.int8), q.sum(axis=2).astype(np.int32),
            (amax / np.float32(127)).astype(np.float32))


def reference(x: np.ndarray, packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """What the kernel computes, in its order: per block, the exact integer dot product
    times (weight scale x activation scale), added to the running float32 sum."""
    qw, sw = unpack_weights(packed, scales)
    qa, _, sa = quantize_rows(x)
    k, n = qw.shape
    out = np.zeros((x.shape[0], n), np.float32)
    for b in range(k // BLOCK):
        rows = slice(b * BLOCK, (b + 1) * BLOCK)
        dot = qa[:, rows].astype(np.int32) @ qw[rows].astype(np.int32)
        out = out + dot.astype(np.float32) * (sw[b][None, :] * sa[:, b:b + 1])
    return out
