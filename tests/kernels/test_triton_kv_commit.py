"""The Triton ``kv_commit`` kernel against the reference: paths with padding, rows with
different past lengths, a commit up to the cache's last slot, head dims that are not
powers of two, more planes than one program copies, a strided cache, bounds checks.

On the CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it on Linux)")

from leapc.kernels import kv_commit as declaration  # noqa: E402
from leapc.kernels import reference  # noqa: E402
from leapc.kernels.triton_kv_commit import kv_commit  # noqa: E402


def step_tensors(layers, batch, kv_heads, capacity, head_dim, new, device, seed=0):
    """A random cache ``[L, 2, B, Hkv, C, D]`` and a step's ``present`` of ``new`` rows."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(layers, 2, batch, kv_heads, capacity, head_dim, generator=g)
    present = torch.randn(layers, 2, batch, kv_heads, new, head_dim, generator=g)
    return cache.to(device), present.to(device)


def assert_matches_reference(cache, present, rows, start):
    rows, start = rows.to(cache.device), start.to(cache.device)
    want = cache.clone()
    reference.kv_commit(want, present, rows, start)
    kv_commit(cache, present, rows, start)
    assert torch.equal(cache, want)


# (layers, kv_heads, head_dim): planes L * 2 * Hkv = 4, 12, 40 (three programs of 16)
@pytest.mark.parametrize("layers, kv_heads, head_dim", [(1, 2, 16), (2, 3, 5), (4, 5, 24)])
def test_paths_match_reference(triton_device, layers, kv_heads, head_dim):
    """Row 0 accepts three nodes, row 1 only the root, row 2 all five up to the last slot,
    row 3 nothing (an all-padding row)."""
    cache, present = step_tensors(layers, 4, kv_heads, 20, head_dim, 5, triton_device)
    rows = torch.tensor([[0, 2, 4, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, 4],
                         [-1, -1, -1, -1, -1]])
    assert_matches_reference(cache, present, rows, torch.tensor([6, 0, 15, 3]))


def test_strided_cache_matches_reference(triton_device):
    """The cache as a view of a larger buffer (the first 12 of 16 slots)."""
    buffer, present = step_tensors(2, 2, 2, 16, 12, 4, triton_device)
    cache = buffer[:, :, :, :, :12]
    assert not cache.is_contiguous()
    assert_matches_reference(cache, present, torch.tensor([[0, 3], [0, 1]]),
                             torch.tensor([10, 2]))


def test_overflowing_commit_is_refused_before_launch(triton_device):
    cache, present = step_tensors(1, 1, 2, 8, 16, 4, triton_device)
    before = cache.clone()
    with pytest.raises(ValueError, match="needs 9 slots; the cache holds 8"):
        kv_commit(cache, present, torch.tensor([[0, 1, 2]], device=triton_device),
                  torch.tensor([6], device=triton_device))
    assert torch.equal(cache, before)


def test_cuda_registration_launches_this_kernel(triton_device):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("leapc::kv_commit", "CUDA")
    cache, present = step_tensors(2, 2, 2, 10, 8, 3, triton_device)
    rows, start = torch.tensor([[0, 2], [0, 1]]), torch.tensor([1, 8])
    want = cache.clone()
    kv_commit(want, present, rows.to(triton_device), start.to(triton_device))
    declaration.triton_kernel(cache, present, rows.to(triton_device), start.to(triton_device))
    assert torch.equal(cache, want)
