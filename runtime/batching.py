"""Continuous batching: the generations of many requests share each step call.

A `Scheduler` keeps a running batch of up to ``max_batch`` rows. Each `Scheduler.step`:

1. retires the rows that were cancelled since (their KV rows are freed; rows that
   finish are retired at the end of the step that finished them);
2. prefills one chunk of the oldest request still prefilling, in that request's own
   one-row cache, so a long prompt holds the batch up by one chunk per step, not by the
   whole prompt; a request whose prompt is done samples its first token and joins the
   batch (its KV copied into a row of `BatchKVCache`). With a `PrefixCache`, a request
   starts from the KV of the longest run of whole blocks an earlier prompt shared with
   it, and its finished prompt's blocks are kept for later ones;
3. decodes: every row drafts with its own drafter, the drafts are padded to the widest
   and verified in one call of the step program (``B`` rows, per-row positions, masks and
   past lengths), and each row accepts and commits its own path in its own slots.

Why a row's tokens are exactly those of the same request alone: each row's logits depend
on its own tokens, positions and visible keys only. Padding nodes sit after a row's real
ones and no real node attends to them; the past columns a row sees are its own valid
slots; and the step's arithmetic for a row does not depend on the other rows or on N
(the N-invariance DESIGN §7a asks of every engine, by construction in leapc's kernels).
Each row keeps its own drafter, sampler stream and stop rule (`decode.Progress`, the same
code the single-request loop runs), so sampling is exact per row as it is alone.

Policies whose drafter works inside the target's cache or verifies through programs of
its own (early exit, Kangaroo, layer skip, SWIFT) do not batch (`PolicySpec.batches`):
they run alone, one step per `Scheduler.step`, with nothing else admitted meanwhile.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from leapc.ir.dims import ModelDims
from leapc.runtime.decode import (
    GenerationStats,
    Progress,
    StopConfig,
    check_prompt,
    draft_budget,
    prefill,
)
from leapc.runtime.drafters.base import Draft, Drafter
from leapc.runtime.healing import Healing
from leapc.runtime.kv_cache import BLOCK, KVCache, accepted_rows
from leapc.runtime.prefix_cache import PrefixCache
from leapc.runtime.sampling import SamplingConfig
from leapc.runtime.step import StepFunction


class BatchKVCache:
    """The running batch's KV: one buffer ``[L, 2, B, Hkv, C, Dh]`` and a length per row.

    The buffer is passed whole as the step's ``past`` (no copy), so its B rows are the
    step's rows. A request that joins takes a free row in place (`place`); only growing
    the batch or dropping free rows rebuilds it (one copy of the valid slots). ``C`` grows
    in blocks like `KVCache`'s and shrinks to ``max_seq - N`` when a step needs the room.
    """

    def __init__(self, dims: ModelDims, max_seq: int):
        self.layers, self.max_seq = dims.num_layers, max_seq
        self.row_shape = (dims.num_layers, 2, dims.num_kv_heads, dims.head_dim)
        self.dtype = np.dtype(dims.dtype)
        self.lengths: list[int] = []
        self.buffer = self._allocate(0, BLOCK)

    def _allocate(self, rows: int, capacity: int) -> np.ndarray:
        layers, two, heads, head_dim = self.row_shape
        return np.zeros((layers, two, rows, heads, capacity, head_dim), self.dtype)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.buffer.shape[4]

    def rebuild(self, keep: list[int], joining: list[KVCache]) -> None:
        """Rows ``keep`` (in that order) then one row per cache in ``joining``."""
        lengths = [self.lengths[r] for r in keep] + [c.length for c in joining]
        need = min(-(-max(lengths, default=1) // BLOCK) * BLOCK, self.max_seq)
        fresh = self._allocate(len(lengths), max(self.capacity, need))
        for i, r in enumerate(keep):
            fresh[:, :, i, :, : lengths[i]] = self.buffer[:, :, r, :, : lengths[i]]
        for i, cache in enumerate(joining, start=len(keep)):
            fresh[:, :, i, :, : cache.length] = cache.buffer[: self.layers, :, 0, :, : cache.length]
        self.buffer, self.lengths = fresh, lengths

    def place(self, row: int, cache: KVCache) -> None:
        """Row ``row`` (free) takes ``cache``'s valid slots; the slots after them are
        never visible to it (the mask), whatever they hold."""
        if cache.length > self.capacity:
            self._set_capacity(min(-(-cache.length // BLOCK) * BLOCK, self.max_seq))
        self.buffer[:, :, row, :, : cache.length] = cache.buffer[: self.layers, :, 0, :, : cache.length]
        self.lengths[row] = cache.length

    def inputs(self, drafts: list[Draft]) -> tuple[np.ndarray, ...]:
        """Step inputs verifying row b's ``drafts[b]``: its nodes padded to the widest
        draft with token 0, each padding node seeing the row's past and itself (no real
        node sees it)."""
        nodes = [d.step_nodes() for d in drafts]
        width = max(len(tokens) for tokens, _, _ in nodes)
        if self.capacity + width > self.max_seq:  # the rows' budgets keep their pasts in it
            self._set_capacity(self.max_seq - width)
        B, C = self.rows, self.capacity
        tokens = np.zeros((B, width), np.int64)
        positions = np.zeros((B, width), np.int64)
        mask = np.zeros((B, width, C + width), bool)
        mask[:, :, C:] = np.eye(width, dtype=bool)
        for b, (row_tokens, offsets, node_mask) in enumerate(nodes):
            n, length = len(row_tokens), self.lengths[b]
            tokens[b, :n] = row_tokens
            positions[b] = length
            positions[b, :n] += offsets
            mask[b, :, :length] = True
            mask[b, :n, C : C + n] = node_mask
        return tokens, positions, self.buffer, mask

    def _set_capacity(self, capacity: int) -> None:
        fresh = self._allocate(self.rows, capacity)
        kept = min(capacity, self.capacity)
        fresh[..., :kept, :] = self.buffer[..., :kept, :]
        self.buffer = fresh

    def commit(self, row: int, present: np.ndarray, path: list[int]) -> None:
        """Append row ``row``'s accepted nodes ``path`` of ``present`` ``[L, 2, 1, Hkv,
        N, Dh]`` (that row's slice of the step's)."""
        start = self.lengths[row]
        end = start + len(path)
        if end > self.capacity:
            self._set_capacity(min(-(-end // BLOCK) * BLOCK, self.max_seq))
        self.buffer[:, :, row, :, start:end] = accepted_rows(present[:, :, 0], path)
        self.lengths[row] = end


@dataclass(frozen=True)
class RowSlicing:
    """Where each of the step's outputs keeps its batch axis and its N axis (None: the
    output has no per-node axis), read from the program's signature."""

    axes: dict[str, tuple[int, int | None]]

    @classmethod
    def of(cls, shapes: dict[str, tuple[str, ...]]) -> RowSlicing:
        return cls({name: (shape.index("B"), shape.index("N") if "N" in shape else None)
                    for name, shape in shapes.items()})

    def row(self, out: dict[str, np.ndarray], b: int, n: int) -> dict[str, np.ndarray]:
        """Row ``b``'s outputs, batch axis kept (size one), its first ``n`` nodes."""
        sliced = {}
        for name, value in out.items():
            batch, nodes = self.axes[name]
            index = [slice(None)] * value.ndim
            index[batch] = slice(b, b + 1)
            if nodes is not None:
                index[nodes] = slice(0, n)
            sliced[name] = value[tuple(index)]
        return sliced


@dataclass(eq=False)
class Sequence:
    """One request in a scheduler: its prompt, drafter and sampler stream, its own cache
    while it prefills, then its progress as a row of the batch; ``token_ids``: what it
    has emitted so far."""

    prompt: list[int]
    drafter: Drafter
    sampling: SamplingConfig
    stop: StopConfig
    rng: np.random.Generator
    stats: GenerationStats
    cache: KVCache | None  # its own while it prefills; None once its rows are the batch's
    healing: Healing | None = None  # the prompt is already backed up (runtime/healing.py)
    batches: bool = True  # False: runs alone (its drafter needs the target cache)
    solo: Iterator[list[int]] | None = None  # a non-batching policy's own decode loop
    prefilled: int = 0
    progress: Progress | None = None
    cancelled: bool = False
    token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.cancelled or self.stats.stop_reason is not None


# A free row's node in a decode step: any token, seeing no past (its length is 0).
FREE_ROW = Draft.root_only(0)


class Scheduler:
    """Admit, prefill in chunks, step the batch, retire (see the module docstring).

    Not thread-safe: one thread calls `submit`, `cancel` and `step` (a server's worker).
    """

    def __init__(self, step: StepFunction, slicing: RowSlicing, dims: ModelDims, max_seq: int,
                 chunk: int, max_batch: int, step_nodes: int | None = None,
                 prefixes: PrefixCache | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.step_program, self.slicing, self.chunk = step, slicing, chunk
        self.max_batch, self.step_nodes = max_batch, step_nodes
        self.prefixes = prefixes  # prompt KV shared across requests (runtime/prefix_cache.py)
        self.cache = BatchKVCache(dims, max_seq)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        # Row b of `cache` is rows[b]; None: a free row (a step gives it one padding node).
        self.rows: list[Sequence | None] = []
        self.alone: Sequence | None = None  # a non-batching sequence, running by itself

    def submit(self, sequence: Sequence) -> None:
        check_prompt(sequence.prompt, self.cache.max_seq)
        self.waiting.append(sequence)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running or self.alone)

    @property
    def running(self) -> list[Sequence]:
        """The sequences in the batch."""
        return [s for s in self.rows if s is not None]

    @property
    def occupancy(self) -> int:
        """Requests holding KV rows: in the batch or prefilling."""
        return len(self.running) + len(self.prefilling) + (self.alone is not None)

    def step(self) -> list[tuple[Sequence, list[int]]]:
        """One round; the tokens each sequence emitted in it (a cancelled or finished
        sequence is dropped and emits nothing more)."""
        self._retire()
        solo = self._solo()
        if solo is not None:
            return self._run_solo(solo)
        emitted: list[tuple[Sequence, list[int]]] = []
        self._admit()
        if self.prefilling:
            emitted += self._prefill_chunk(self.prefilling[0])
        if self.running:
            emitted += self._decode()
        self._retire()  # what finished frees its rows now, not at the next step
        return emitted

    # ------------------------------------------------------------------ phases

    def _retire(self) -> None:
        """Free the rows of finished sequences; drop free rows when nobody is about to
        take one (a free row still costs a padding node per step)."""
        for b, sequence in enumerate(self.rows):
            if sequence is not None and sequence.finished:
                self.rows[b] = None
                self.cache.lengths[b] = 0
        self.prefilling = [s for s in self.prefilling if not s.cancelled]
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        if None in self.rows and not (self.prefilling or self.waiting):
            keep = [b for b, s in enumerate(self.rows) if s is not None]
            self.cache.rebuild(keep, [])
            self.rows = [self.rows[b] for b in keep]
        if self.alone is not None and self.alone.cancelled:
            self.alone = None

    def _solo(self) -> Sequence | None:
        """The non-batching sequence to run now: the one running, or the next waiting
        once the batch is empty."""
        if self.alone is None and not self.running and not self.prefilling and self.waiting \
                and not self.waiting[0].batches:
            self.alone = self.waiting.popleft()
        return self.alone

    def _run_solo(self, sequence: Sequence) -> list[tuple[Sequence, list[int]]]:
        """One step of its own decode loop (its prefill, the first time)."""
        new = next(sequence.solo)
        if sequence.finished:
            self.alone = None
        return self._emit(sequence, new)

    def _admit(self) -> None:
        while self.waiting and self.waiting[0].batches and self.occupancy < self.max_batch:
            sequence = self.waiting.popleft()
            if self.prefixes is not None:
                sequence.prefilled = self.prefixes.reuse(sequence.prompt, sequence.cache)
                sequence.stats.cached_prompt_tokens = sequence.prefilled
            self.prefilling.append(sequence)

    def _prefill_chunk(self, sequence: Sequence) -> list[tuple[Sequence, list[int]]]:
        start = time.perf_counter()
        piece = sequence.prompt[sequence.prefilled : sequence.prefilled + self.chunk]
        out = prefill(self.step_program, sequence.cache, piece, len(piece))  # one call
        sequence.prefilled += len(piece)
        stats = sequence.stats
        stats.prefill_calls += 1
        stats.prefill_s += time.perf_counter() - start
        if sequence.prefilled < len(sequence.prompt):
            return []
        stats.prompt_tokens = len(sequence.prompt)
        if self.prefixes is not None:
            self.prefixes.store(sequence.prompt, sequence.cache)
        sequence.progress = Progress(sequence.prompt, out, sequence.drafter, sequence.sampling,
                                     sequence.stop, sequence.rng, stats, self.cache.max_seq,
                                     sequence.healing)
        self.prefilling.remove(sequence)
        if not sequence.progress.done:
            self._join(sequence)
        return self._emit(sequence, sequence.progress.new)

    def _join(self, sequence: Sequence) -> None:
        """Its prompt's KV into a free row, or a new one."""
        if None in self.rows:
            row = self.rows.index(None)
            self.cache.place(row, sequence.cache)
            self.rows[row] = sequence
        else:
            self.cache.rebuild(list(range(len(self.rows))), [sequence.cache])
            self.rows.append(sequence)
        sequence.cache = None

    def _decode(self) -> list[tuple[Sequence, list[int]]]:
        start = time.perf_counter()
        cache = self.cache
        # Every row's nodes must fit beside the longest row's past (C + N <= max_seq).
        room = cache.max_seq - max(cache.lengths) - 1
        drafts = [FREE_ROW if s is None else s.progress.draft(self._budget(s, b, room))
                  for b, s in enumerate(self.rows)]
        called = time.perf_counter()
        out = self.step_program(*cache.inputs(drafts))
        program_s = time.perf_counter() - called
        emitted = []
        for b, (sequence, draft) in enumerate(zip(self.rows, drafts, strict=True)):
            if sequence is None:
                continue
            row = self.slicing.row(out, b, draft.step_size)
            new = sequence.progress.conclude(
                draft, row, lambda present, path, b=b: cache.commit(b, present, path))
            sequence.stats.program_s += program_s
            sequence.stats.calls["full"] += 1
            emitted += self._emit(sequence, new)
        elapsed = time.perf_counter() - start
        for sequence in self.running:
            sequence.stats.decode_s += elapsed
        return emitted

    def _budget(self, sequence: Sequence, row: int, room: int) -> int:
        """`decode.draft_budget` for a row, within the batch's room and its share of
        ``step_nodes``: every row pads to the widest, so a step costs rows x width, and on
        a machine whose step is compute-bound at a few rows, drafts must narrow as the
        batch fills (bench/results/serving_bundled.md)."""
        own = min(draft_budget(self.cache.lengths[row], self.cache.max_seq, self.chunk,
                               sequence.stop, sequence.stats.new_tokens), room - 1)
        if self.step_nodes is not None:
            own = min(own, self.step_nodes // len(self.rows) - 1)
        return max(0, own)

    @staticmethod
    def _emit(sequence: Sequence, new: list[int]) -> list[tuple[Sequence, list[int]]]:
        sequence.token_ids.extend(new)
        return [(sequence, new)]
