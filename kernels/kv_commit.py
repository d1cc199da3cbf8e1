"""``torch.ops.leapc.kv_commit``: write a step's accepted keys and values into the cache.

After a verify step, the accepted path's rows of the step's ``present [L, 2, B, Hkv, N,
D]`` are gathered into the cache ``[L, 2, B, Hkv, C, D]`` at each row's next free slots
(`leapc.kernels.reference.kv_commit` states the exact semantics).

The op mutates the cache (``mutates_args=("cache",)``) and returns nothing. A commit
writes ``A`` rows, a few kilobytes; a functional version would return a fresh cache, a
copy of all ``C`` slots of every layer at every step, which is the cost a runtime-owned
cache exists to avoid (DESIGN §2). Declaring the mutation costs nothing under
``torch.export``: the graph keeps the in-place call, and its functional form
(``run_decompositions``) wraps it in ``auto_functionalized`` with ``cache`` listed among
the mutated user inputs, which Inductor turns back into the in-place call.

Its Triton kernel, registered for CUDA tensors where triton is installed, is in
`leapc.kernels.triton_kv_commit`.
"""

from __future__ import annotations

import torch

from leapc.kernels import reference, triton_installed


def check_shapes(cache, present, rows, start) -> None:
    """The static part of the contract: ranks, and the model dims cache and present share
    (layers, K/V, KV heads, head dim), and their dtype."""
    same_dims = (cache.shape[:2], cache.shape[3], cache.shape[5]) == \
        (present.shape[:2], present.shape[3], present.shape[5])
    if (cache.ndim, present.ndim, rows.ndim, start.ndim) != (6, 6, 2, 1) or not same_dims \
            or cache.dtype != present.dtype:
        raise ValueError(f"kv_commit: cache {tuple(cache.shape)} {cache.dtype}, present "
                         f"{tuple(present.shape)} {present.dtype}, rows {tuple(rows.shape)}, "
                         f"start {tuple(start.shape)} do not fit [L, 2, B, Hkv, C, D], "
                         f"[L, 2, B, Hkv, N, D] of the same dtype, [B, A], [B]")


kv_commit = torch.library.custom_op("leapc::kv_commit", mutates_args=("cache",))(
    reference.kv_commit
)


@kv_commit.register_fake
def _(cache, present, rows, start):
    check_shapes(cache, present, rows, start)


def triton_kernel(cache, present, rows, start):
    """The CUDA implementation. The kernel module is imported at the first launch, not with
    the declaration (see `leapc.kernels.triton_installed`)."""
    from leapc.kernels.triton_kv_commit import kv_commit as launch

    launch(cache, present, rows, start)


if triton_installed():
    kv_commit.register_kernel("cuda")(triton_kernel)
