"""The runtime-owned KV cache: exact commits, block growth, and the ``T + N <= max_seq`` bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leapc.runtime.kv_cache import BLOCK, KVCache

LAYERS, HEADS, HEAD_DIM = 2, 3, 4


def make_cache(max_seq: int = 1024, batch: int = 1, dtype: str = "float32") -> KVCache:
    return KVCache(LAYERS, HEADS, HEAD_DIM, dtype, max_seq, batch)


_values = np.random.default_rng(0)


def present(n: int, batch: int = 1, dtype: str = "float32") -> np.ndarray:
    """``[L, 2, B, Hkv, n, Dh]`` of random values (distinct rows, never exactly 0)."""
    shape = (LAYERS, 2, batch, HEADS, n, HEAD_DIM)
    return (1.0 + _values.random(shape)).astype(dtype)


def committed(cache: KVCache) -> np.ndarray:
    return cache.buffer[:, :, :, :, : cache.length]


def test_fresh_cache_is_empty_with_one_block():
    cache = make_cache()
    assert cache.length == 0
    assert cache.capacity == BLOCK
    assert cache.buffer.shape == (LAYERS, 2, 1, HEADS, BLOCK, HEAD_DIM)
    assert cache.buffer.dtype == np.float32
    assert not cache.valid_mask().any()


def test_commit_chain_rows_appends_them_in_order():
    cache = make_cache()
    first, second = present(5), present(3)
    cache.commit(first, np.arange(5))
    cache.commit(second, [0, 1, 2])
    assert cache.length == 8
    np.testing.assert_array_equal(committed(cache), np.concatenate([first, second], axis=4))


def test_commit_prefix_of_chain_keeps_only_accepted_rows():
    cache = make_cache()
    first, second = present(4), present(6)
    cache.commit(first, np.arange(4))
    cache.commit(second, [0, 1])  # a chain of 6 verified, 2 accepted
    assert cache.length == 6
    np.testing.assert_array_equal(committed(cache)[..., :4, :], first)
    np.testing.assert_array_equal(committed(cache)[..., 4:, :], second[..., :2, :])


@pytest.mark.parametrize("rows", [[0, 2, 3], [0, 3], [4], [1, 0], [0, 1, 2, 4]])
def test_commit_tree_rows_lands_exactly_those_rows_after_existing(rows):
    cache = make_cache()
    prefix, tree = present(7), present(5)
    cache.commit(prefix, np.arange(7))
    cache.commit(tree, np.asarray(rows))
    assert cache.length == 7 + len(rows)
    np.testing.assert_array_equal(committed(cache)[..., :7, :], prefix)
    for slot, row in enumerate(rows):
        np.testing.assert_array_equal(cache.buffer[..., 7 + slot, :], tree[..., row, :])
    # nothing was written past the committed slots
    assert not cache.buffer[..., cache.length :, :].any()


def test_commit_batched_cache_and_float16():
    cache = make_cache(batch=2, dtype="float16")
    values = (np.arange(LAYERS * 2 * 2 * HEADS * 5 * HEAD_DIM) % 1000).astype(np.float16)
    tree = values.reshape(LAYERS, 2, 2, HEADS, 5, HEAD_DIM)
    cache.commit(tree, [0, 2, 3])
    assert cache.buffer.dtype == np.float16
    np.testing.assert_array_equal(committed(cache), tree[..., [0, 2, 3], :])


def test_capacity_grows_in_blocks_and_keeps_content():
    cache = make_cache(max_seq=1024)
    chunks = []
    for n in (50, 30, 60, 1, 64, 100):  # crosses several block boundaries, some by far
        chunk = present(n)
        cache.commit(chunk, np.arange(n))
        chunks.append(chunk)
        assert cache.capacity % BLOCK == 0
        assert cache.capacity >= cache.length
        assert cache.capacity - cache.length < BLOCK  # grows to the next block, no further
        np.testing.assert_array_equal(committed(cache), np.concatenate(chunks, axis=4))
    assert cache.length == 305
    assert cache.capacity == 320


def test_capacity_never_exceeds_max_seq_when_growing():
    cache = make_cache(max_seq=100)
    cache.commit(present(60), np.arange(60))
    cache.commit(present(40), np.arange(40))  # exactly fills max_seq
    assert cache.length == 100
    assert cache.capacity == 100


def test_valid_mask_marks_exactly_the_committed_slots():
    cache = make_cache()
    for n, rows in ((3, [0, 1, 2]), (5, [0, 2, 3]), (70, list(range(70))), (2, [1])):
        cache.commit(present(n), rows)
        mask = cache.valid_mask()
        assert mask.dtype == np.bool_
        assert mask.shape == (cache.capacity,)
        assert mask[: cache.length].all()
        assert not mask[cache.length :].any()
    assert cache.length == 3 + 3 + 70 + 1


def test_past_for_is_the_buffer_itself():
    cache = make_cache()
    cache.commit(present(3), np.arange(3))
    past = cache.past_for(1)
    assert past.base is cache.buffer and past.shape == cache.buffer.shape
    assert past.flags.c_contiguous  # ONNX Runtime and torch wrap it without a copy
    np.testing.assert_array_equal(past[..., :3, :], committed(cache))


@pytest.mark.parametrize("max_seq", [10, 64, 65, 100, 256])
def test_past_for_respects_max_seq_over_random_schedules(max_seq):
    rng = np.random.default_rng(max_seq)
    for _ in range(20):
        cache = make_cache(max_seq=max_seq)
        expected = []
        while cache.length < max_seq:
            room = max_seq - cache.length
            if cache.length == 0:
                room -= 1  # N = max_seq on an empty cache: see the test of that edge below
            new = int(rng.integers(1, min(room, 70) + 1))
            past = cache.past_for(new)
            assert past.shape[4] + new <= max_seq, (cache.length, new, past.shape)
            assert past.shape[4] >= cache.length
            assert cache.valid_mask().shape == (past.shape[4],)
            accepted = int(rng.integers(1, new + 1))
            rows = np.sort(rng.choice(new, size=accepted, replace=False))
            chunk = present(new)
            cache.commit(chunk, rows)
            expected.append(chunk[..., rows, :])
            np.testing.assert_array_equal(committed(cache), np.concatenate(expected, axis=4))


@pytest.mark.parametrize("max_seq", [8, 64, 200])
def test_past_for_bound_holds_for_every_step_size(max_seq):
    """For every committed length and every N that fits, ``T + N <= max_seq``."""
    for length in range(0, max_seq, max(1, max_seq // 16)):
        for new in range(1, max_seq - length + (1 if length else 0)):
            cache = make_cache(max_seq=max_seq)
            if length:
                cache.commit(present(length), np.arange(length))
            past = cache.past_for(new)
            assert past.shape[4] + new <= max_seq, (
                f"max_seq={max_seq} length={length} new={new}: past has "
                f"{past.shape[4]} slots, T + N = {past.shape[4] + new}")
            assert past.shape[4] >= length


@pytest.mark.parametrize("max_seq", [8, 64, 256])
def test_past_for_whole_max_seq_on_empty_cache_keeps_the_bound(max_seq):
    """N = max_seq on an empty cache: either a past with T + N <= max_seq, or a ValueError.

    (The step signature has T >= 1, so N = max_seq cannot be served at all; it must not
    return a 1-slot past that makes T + N = max_seq + 1.)
    """
    cache = make_cache(max_seq=max_seq)
    try:
        past = cache.past_for(max_seq)
    except ValueError:
        return
    assert past.shape[4] + max_seq <= max_seq, f"past has {past.shape[4]} slots"


@pytest.mark.parametrize("length, new", [(0, 257), (200, 57), (256, 1), (255, 2)])
def test_past_for_raises_when_length_plus_new_exceeds_max_seq(length, new):
    cache = make_cache(max_seq=256)
    if length:
        cache.commit(present(length), np.arange(length))
    before = cache.buffer
    with pytest.raises(ValueError, match="max_seq"):
        cache.past_for(new)
    assert cache.length == length
    assert cache.buffer is before


def test_past_for_exactly_filling_max_seq_is_allowed():
    cache = make_cache(max_seq=256)
    cache.commit(present(200), np.arange(200))
    past = cache.past_for(56)
    assert past.shape[4] + 56 <= 256
    assert past.shape[4] >= 200


def test_reallocates_only_when_a_block_fills():
    """200 single-token decode steps reallocate at most ceil(200 / BLOCK) times."""
    cache = make_cache(max_seq=1024)
    buffers = [cache.buffer]
    reference = []
    for _ in range(200):
        cache.past_for(1)
        if cache.buffer is not buffers[-1]:
            buffers.append(cache.buffer)
        token = present(1)
        cache.commit(token, [0])
        reference.append(token)
        if cache.buffer is not buffers[-1]:
            buffers.append(cache.buffer)
    reallocations = len(buffers) - 1
    assert reallocations <= math.ceil(200 / BLOCK), reallocations
    np.testing.assert_array_equal(committed(cache), np.concatenate(reference, axis=4))


def test_decode_near_max_seq_does_not_copy_every_step():
    """The tail of a max-length decode (the T + N bound is tight) still reuses the buffer."""
    max_seq = 256
    cache = make_cache(max_seq=max_seq)
    cache.commit(present(100), np.arange(100))
    buffers = [cache.buffer]
    while cache.length < max_seq:
        past = cache.past_for(1)
        assert past.shape[4] + 1 <= max_seq
        if cache.buffer is not buffers[-1]:
            buffers.append(cache.buffer)
        cache.commit(present(1), [0])
        if cache.buffer is not buffers[-1]:
            buffers.append(cache.buffer)
    assert len(buffers) - 1 <= math.ceil(156 / BLOCK) + 2, len(buffers) - 1


def test_scratch_rows_wait_after_the_committed_ones_and_survive_growth():
    """An early-exit draft writes layer 0's rows of three chain nodes past the committed
    slots; the block overflows on the way, and committing the first two keeps them."""
    cache = make_cache()
    cache.commit(present(BLOCK - 1), np.arange(BLOCK - 1))
    rows = present(3)[:1]  # layers < E = 1
    for offset in range(3):
        cache.write_scratch(rows[:, :, :, :, offset : offset + 1], offset)
    assert cache.length == BLOCK - 1 and cache.capacity == 2 * BLOCK
    np.testing.assert_array_equal(cache.buffer[:1, :, :, :, BLOCK - 1 : BLOCK + 2], rows)
    verified = present(3)
    verified[:1] = rows
    cache.commit(verified, [0, 1])
    np.testing.assert_array_equal(committed(cache)[:, :, :, :, -2:], verified[:, :, :, :, :2])
    assert cache.length == BLOCK + 1


def test_extra_layers_are_invisible_to_steps_and_kept_by_commits():
    """A Kangaroo adapter's rows: an extra layer that ``past`` leaves out and ``commit``
    leaves alone, so scratch rows written there become valid as their slots commit."""
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, "float32", max_seq=256, extra_layers=1)
    assert cache.past_for(1).shape[0] == LAYERS
    adapter = present(3)[:1]
    cache.write_scratch(adapter, 0, layer=LAYERS)
    cache.commit(present(BLOCK + 2), np.arange(BLOCK + 2))  # grows the buffer
    assert cache.buffer.shape[0] == LAYERS + 1
    np.testing.assert_array_equal(cache.buffer[LAYERS:, :, :, :, :3], adapter)
    assert not cache.buffer[LAYERS:, :, :, :, 3:].any()


def test_prefix_is_a_contiguous_past_that_ends_where_refed_tokens_start():
    """A window refed from slot ``start`` reads only the slots before it: however full the
    cache, ``T + N`` is at most its length."""
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, "float32", max_seq=100, extra_layers=1)
    rows = present(98)
    cache.commit(rows, np.arange(98))
    past = cache.prefix(98 - 32)
    assert past.flags.c_contiguous and past.shape[0] == LAYERS + 1
    assert past.shape[4] + 32 <= cache.max_seq
    np.testing.assert_array_equal(past[:LAYERS], rows[..., :66, :])
    assert cache.prefix(0).shape[4] == 1  # T >= 1: one slot, which the mask leaves out


@pytest.mark.parametrize("write", ["commit", "scratch"])
def test_writing_past_max_seq_is_refused_by_name(write):
    cache = make_cache(max_seq=100)
    cache.commit(present(98), np.arange(98))
    with pytest.raises(ValueError, match="up to 101 overflows max_seq 100"):
        if write == "commit":
            cache.commit(present(3), np.arange(3))
        else:
            cache.write_scratch(present(1), 2)
    assert cache.length == 98
