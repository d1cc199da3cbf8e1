"""bfloat16-weight GEMM for small M: the weight layout of `native/bf16_gemm.c` and its
reference.

A bfloat16 checkpoint (most current ones) runs in float32 at twice the bytes a decode
step streams; the kernel keeps the weights in bfloat16 and widens them in registers, and
sums every output in one fixed order (one FMA per input, inputs in order), so a row's
result does not depend on M (see the C file).

`pack_weights` rounds a float matrix to bfloat16 in the kernel's layout; `reference`
computes what the kernel computes, so tests can compare bit for bit.
"""

from __future__ import annotations

import numpy as np

TILE = 16  # output columns per 512-bit register


def supports(k: int, n: int) -> bool:
    """Whether a [k, n] weight fits the kernel's blocking."""
    return k > 0 and n % TILE == 0


def to_bfloat16(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even (finite values)."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def pack_weights(w: np.ndarray) -> np.ndarray:
    """[K, N] float -> [N/16, K*16] uint16: per 16-column tile, K rows of 16 bfloat16."""
    k, n = w.shape
    if not supports(k, n):
        raise ValueError(f"bf16_gemm needs N % {TILE} == 0, got {k} x {n}")
    tiles = to_bfloat16(w).reshape(k, n // TILE, TILE).transpose(1, 0, 2)
    return np.ascontiguousarray(tiles).reshape(n // TILE, k * TILE)


def unpack_weights(packed: np.ndarray) -> np.ndarray:
    """The inverse layout: [K, N] float32 (the bfloat16 values)."""
    tiles, k16 = packed.shape
    k = k16 // TILE
    return from_bfloat16(packed.reshape(tiles, k, TILE).transpose(1, 0, 2).reshape(k, -1))


def reference(x: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """What the kernel computes, in its order: ``acc = fma(x_k, w_k, acc)`` for k = 0..K-1.

    Each FMA is computed in float64 and rounded once to float32. A float32 x a bfloat16
    product has at most 32 significant bits, so float64 holds it exactly, and the sum too
    unless the two terms lie more than ~21 binary orders apart; only then could the
    float64 rounding land on a float32 tie (odds ~2^-28 of those rare sums)."""
    w = unpack_weights(packed).astype(np.float64)
    x64 = x.astype(np.float32).astype(np.float64)
    acc = np.zeros((x.shape[0], w.shape[1]), np.float32)
    for k in range(w.shape[0]):
        acc = (acc.astype(np.float64) + x64[:, k:k + 1] * w[k][None, :]).astype(np.float32)
    return acc
