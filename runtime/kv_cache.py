"""The KV cache, owned by the runtime (the step program itself is stateless).

One contiguous buffer ``[L, 2, B, Hkv, C, Dh]`` whose capacity ``C`` grows in blocks.
Each step passes the whole buffer as ``past`` (no copy: ONNX Runtime and torch both wrap
the numpy memory) and the mask marks which slots are valid, so ``T = C`` and the step's
attention reads at most one block of padding. Committing writes only the accepted rows
of ``present``; the buffer is reallocated (one copy) only when a block fills up.

``extra_layers`` are rows of the same shape after the model's (a Kangaroo adapter's KV):
steps never see them, drafters write them as scratch, and they follow every resize.
"""

from __future__ import annotations

import numpy as np

BLOCK = 64


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: str,
                 max_seq: int, batch: int = 1, extra_layers: int = 0):
        self.layers = layers  # the model's: what ``past`` holds and ``commit`` writes
        self.shape = (layers + extra_layers, 2, batch, kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.max_seq = max_seq
        self.length = 0  # committed slots, same for every sequence in the batch
        self.buffer = self._allocate(BLOCK)

    def _allocate(self, capacity: int) -> np.ndarray:
        layers, two, batch, heads, head_dim = self.shape
        return np.zeros((layers, two, batch, heads, capacity, head_dim), self.dtype)

    @property
    def capacity(self) -> int:
        return self.buffer.shape[4]

    def _resize(self, capacity: int) -> None:
        # Scratch rows after the committed ones move too (a self-drafting program's, which
        # verification may still read), as far as they fit.
        fresh = self._allocate(capacity)
        kept = min(capacity, self.capacity)
        fresh[:, :, :, :, :kept] = self.buffer[:, :, :, :, :kept]
        self.buffer = fresh

    def _fit(self, end: int) -> None:
        """Grow to hold slots up to ``end``; a write past max_seq is a caller's bug."""
        if end > self.max_seq:
            raise ValueError(f"KV cache: writing slots up to {end} overflows max_seq "
                             f"{self.max_seq}")
        if end > self.capacity:
            self._resize(min(_round_up(end, BLOCK), self.max_seq))

    def past_for(self, new: int) -> np.ndarray:
        """The buffer to pass as ``past`` for a step of ``new`` tokens (``T + N <= max_seq``)."""
        if self.length + new > self.max_seq or new >= self.max_seq:
            # new >= max_seq: even one past slot (T >= 1) would break T + N <= max_seq
            raise ValueError(f"KV cache: {self.length} + {new} tokens do not fit max_seq "
                             f"{self.max_seq}")
        limit = self.max_seq - new
        if self.capacity > limit:
            self._resize(max(limit, self.length, 1))
        return self.buffer[: self.layers]  # a view: the leading axis keeps it contiguous

    def prefix(self, slots: int) -> np.ndarray:
        """Every layer's first ``slots`` slots (at least one, since ``T >= 1``), contiguous:
        the past of a step that feeds committed tokens from slot ``slots`` on again (a
        window being scored, an adapter's catch-up). Such a step reads nothing after them,
        so ``T + N`` is the refed tokens' end (one more if ``slots`` is 0), however little
        room the cache has left."""
        return np.ascontiguousarray(self.buffer[:, :, :, :, : max(slots, 1)])

    def valid_mask(self) -> np.ndarray:
        """``[C]`` bool: the committed slots."""
        mask = np.zeros(self.capacity, dtype=bool)
        mask[: self.length] = True
        return mask

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (a draft model's rejected tokens)."""
        self.length = min(self.length, length)

    def write_scratch(self, present: np.ndarray, offset: int, layer: int = 0) -> None:
        """Write ``present`` (``[l, 2, B, H, n, Dh]``: rows of n tokens for l layers from
        ``layer`` on) at slots ``length + offset`` on, without committing them: an
        early-exit draft's rows, which become the target's when verification accepts their
        tokens (committing writes the model's layers only, so extra layers' rows stay)."""
        start = self.length + offset
        end = start + present.shape[4]
        self._fit(end)
        self.buffer[layer : layer + present.shape[0], :, :, :, start:end] = present

    def commit(self, present: np.ndarray, rows: np.ndarray | list[int]) -> None:
        """Append ``present[..., rows, :]`` (the accepted new tokens, in order)."""
        end = self.length + len(rows)
        self._fit(end)
        self.buffer[: present.shape[0], :, :, :, self.length : end] = accepted_rows(present, rows)
        self.length = end


def accepted_rows(present: np.ndarray, rows: np.ndarray | list[int]) -> np.ndarray:
    """``present``'s rows ``rows`` along its node axis (the second to last). The first
    ones in order (every `ar` step, a prefill, an accepted chain) are a slice, which numpy
    copies ~3x faster than the gather of the general case (a one-row commit of the bundled
    model's 12 layers: 5.3 -> 1.8 us)."""
    count = len(rows)
    first = count > 0 and rows[0] == 0 and rows[-1] == count - 1 and \
        (count < 3 or np.array_equal(rows, np.arange(count)))
    return present[..., :count, :] if first else present[..., rows, :]
