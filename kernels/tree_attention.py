"""``torch.ops.leapc.tree_attention``: attention over a prefix-valid cache plus a token tree.

The step program's dense ``mask [B, N, T + N]`` repeats, for every new token, which cache
slots are valid. The runtime's cache is prefix-valid (row b's valid slots are exactly
``0 .. past_len[b] - 1``) and every new token sees the same slots, so the mask compacts
to ``past_len [B]`` plus the ancestor matrix ``tree_mask [B, N, N]`` of the new tokens
(causal for a prefill chunk, which is a chain). `compact_step_mask` derives both from a
step mask; the op computes exactly the dense-mask attention from them (see
`leapc.kernels.reference.tree_attention` for the maths).

The op is declared with ``torch.library`` so it survives ``torch.export``: its fake
implementation checks the shapes and gives the output's. Its ONNX translation is in
`leapc.kernels.onnx_translations`; its Triton kernel, registered for CUDA tensors where
triton is installed, in `leapc.kernels.triton_tree_attention`.
"""

from __future__ import annotations

import torch

from leapc.kernels import reference, triton_installed


def check_shapes(q, k, v, past_len, tree_mask) -> None:
    """The static part of the contract (head counts, head dim, ranks). Symbolic sizes are
    not compared: under export that would add guards narrowing the program's dims."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"tree_attention: {heads} query heads are not a multiple of "
                         f"{kv_heads} KV heads")
    if (q.ndim, k.ndim, v.ndim, past_len.ndim, tree_mask.ndim) != (4, 4, 4, 1, 3) \
            or k.shape[-1] != q.shape[-1] or v.shape[1] != kv_heads:
        raise ValueError(f"tree_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, past_len {tuple(past_len.shape)}, tree_mask "
                         f"{tuple(tree_mask.shape)} do not fit [B, H, N, D], [B, Hkv, T + N, D], "
                         f"[B, Hkv, T + N, Dv], [B], [B, N, N]")


# Every device runs the reference until a faster kernel registers for it.
tree_attention = torch.library.custom_op("leapc::tree_attention", mutates_args=())(
    reference.tree_attention
)


@tree_attention.register_fake
def _(q, k, v, past_len, tree_mask, scale, softcap=0.0, window=0):
    check_shapes(q, k, v, past_len, tree_mask)
    batch, heads, new, _ = q.shape
    return q.new_empty(batch, heads, new, v.shape[-1])


def triton_kernel(q, k, v, past_len, tree_mask, scale, softcap=0.0, window=0):
    """The CUDA implementation. The kernel module is imported at the first launch, not with
    the declaration (see `leapc.kernels.triton_installed`)."""
    from leapc.kernels.triton_tree_attention import tree_attention as launch

    return launch(q, k, v, past_len, tree_mask, scale, softcap, window)


if triton_installed():
    tree_attention.register_kernel("cuda")(triton_kernel)


def past_lengths(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: the valid cache slots of each row of a step mask ``[B, N, T + N]``.

    Exact for the runtime's masks, whose past columns are a prefix of Trues, the same for
    every new token: the first token's visible keys minus the tree nodes it sees. (Summing
    a slice of the past columns instead would make export guard the view's contiguity,
    ``B * T >= 2`` and ``T != 1``, and refuse a one-slot cache.)
    """
    return mask[:, 0].sum(dim=-1) - tree_part(mask)[:, 0].sum(dim=-1)


def tree_part(mask: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` bool: the new tokens' ancestor matrix, the last N columns of the mask."""
    return mask[:, :, mask.shape[2] - mask.shape[1]:]
