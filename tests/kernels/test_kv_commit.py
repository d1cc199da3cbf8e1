"""``leapc.kv_commit``: the reference against the runtime's `KVCache.commit`, its bounds
checks, and the op's declaration (a mutation of the cache) under export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from trees import greedy_step, random_tree

import leapc.kernels.kv_commit  # noqa: F401  (declares torch.ops.leapc.kv_commit)
from leapc.kernels import reference
from leapc.runtime.kv_cache import KVCache

LAYERS, KV_HEADS, HEAD_DIM, CAPACITY = 2, 3, 5, 24


def commit_inputs(batch, new, seed=0):
    """A random cache ``[L, 2, B, Hkv, C, D]`` and a step's ``present`` of ``new`` rows."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(LAYERS, 2, batch, KV_HEADS, CAPACITY, HEAD_DIM, generator=g)
    present = torch.randn(LAYERS, 2, batch, KV_HEADS, new, HEAD_DIM, generator=g)
    return cache, present


def runtime_commit(cache_row: torch.Tensor, present_row: torch.Tensor, start: int,
                   rows: list[int]) -> np.ndarray:
    """What `KVCache.commit` makes of one batch row: its first ``start + len(rows)`` slots."""
    kv = KVCache(LAYERS, KV_HEADS, HEAD_DIM, "float32", max_seq=4 * CAPACITY)
    kv.commit(cache_row.numpy(), np.arange(start))
    kv.commit(present_row.numpy(), rows)
    return kv.buffer[:, :, :, :, : kv.length]


def test_reference_equals_runtime_commit_per_row():
    """Rows of a batch commit different paths from different past lengths; every other
    slot keeps its value."""
    cache, present = commit_inputs(batch=3, new=6)
    rows = torch.tensor([[0, 2, 5, -1], [0, -1, -1, -1], [0, 1, 3, 4]])
    start = torch.tensor([4, 0, 20])
    committed = cache.clone()
    reference.kv_commit(committed, present, rows, start)
    for b in range(3):
        accepted = rows[b][rows[b] >= 0].tolist()
        end = int(start[b]) + len(accepted)
        want = runtime_commit(cache[:, :, b:b + 1], present[:, :, b:b + 1], int(start[b]),
                              accepted)
        np.testing.assert_array_equal(committed[:, :, b:b + 1, :, :end].numpy(), want)
        torch.testing.assert_close(committed[:, :, b, :, end:], cache[:, :, b, :, end:])


def test_greedy_path_commits_as_the_runtime_does():
    """`verify_greedy`'s padded path is ``rows`` as it stands: the two ops compose."""
    g = torch.Generator().manual_seed(3)
    target, tokens, parents = greedy_step([random_tree(8, g) for _ in range(4)], 2, g)
    path, length = reference.verify_greedy(target, tokens, parents)
    cache, present = commit_inputs(batch=4, new=8, seed=1)
    start = torch.tensor([0, 3, 9, 16])
    committed = cache.clone()
    reference.kv_commit(committed, present, path, start)
    for b in range(4):
        accepted = path[b, : length[b]].tolist()
        want = runtime_commit(cache[:, :, b:b + 1], present[:, :, b:b + 1], int(start[b]),
                              accepted)
        end = int(start[b] + length[b])
        np.testing.assert_array_equal(committed[:, :, b:b + 1, :, :end].numpy(), want)


@pytest.mark.parametrize("rows, start, message", [
    ([[0, 1, 2]], [22], "needs 25 slots; the cache holds 24"),
    ([[0, 6]], [0], "beyond the step's 6"),
])
def test_out_of_bounds_commits_are_refused(rows, start, message):
    cache, present = commit_inputs(batch=1, new=6)
    with pytest.raises(ValueError, match=message):
        reference.kv_commit(cache, present, torch.tensor(rows), torch.tensor(start))


def test_commit_filling_the_last_slot_is_accepted():
    cache, present = commit_inputs(batch=1, new=6)
    reference.kv_commit(cache, present, torch.tensor([[0, 4, -1]]), torch.tensor([22]))
    torch.testing.assert_close(cache[:, :, 0, :, 23], present[:, :, 0, :, 4])


def test_op_mutates_the_cache_on_cpu():
    cache, present = commit_inputs(batch=2, new=4)
    want = cache.clone()
    rows, start = torch.tensor([[0, 3], [0, -1]]), torch.tensor([1, 7])
    reference.kv_commit(want, present, rows, start)
    assert torch.ops.leapc.kv_commit(cache, present, rows, start) is None
    assert torch.equal(cache, want)


class Commit(torch.nn.Module):
    def forward(self, cache, present, rows, start):
        torch.ops.leapc.kv_commit(cache, present, rows, start)
        return start + (rows >= 0).sum(dim=1)


def test_export_records_the_cache_as_mutated():
    cache, present = commit_inputs(batch=2, new=4)
    inputs = (cache, present, torch.tensor([[0, 2], [0, -1]]), torch.tensor([3, 5]))
    program = torch.export.export(Commit(), inputs).run_decompositions()
    assert list(program.graph_signature.user_inputs_to_mutate.values()) == ["cache"]
    want = cache.clone()
    reference.kv_commit(want, *inputs[1:])
    program.module()(*inputs)
    assert torch.equal(cache, want)


def test_fake_implementation_refuses_mismatched_caches():
    cache, present = commit_inputs(batch=2, new=4)
    rows, start = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    inputs = (cache, present.double(), rows, start)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in inputs]
        with pytest.raises(ValueError, match="of the same dtype"):
            torch.ops.leapc.kv_commit(*fake)
