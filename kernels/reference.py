"""Pure-torch references of the leapc kernels: readable ground truth, no performance tricks.

Every optimised kernel (Triton, an ONNX translation) is tested against the function of
the same name here. They run on any device and in any floating dtype.
"""

from __future__ import annotations

import torch


def visible_keys(past_len: torch.Tensor, tree_mask: torch.Tensor, past: int) -> torch.Tensor:
    """``[B, N, T + N]`` bool: which keys each new token sees, from the compact form.

    Key ``j < T`` (a cache slot) is visible iff ``j < past_len[b]``: the runtime's cache is
    prefix-valid, so one length per row says everything the dense mask's past columns do.
    Key ``T + i`` (tree node ``i``) is visible to node ``n`` iff ``tree_mask[b, n, i]``.
    """
    batch, new, _ = tree_mask.shape
    slots = torch.arange(past, device=past_len.device)
    valid_past = slots[None, :] < past_len[:, None]  # [B, T]
    return torch.cat([valid_past[:, None, :].expand(batch, new, past), tree_mask], dim=-1)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_len: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of N tree nodes over T cache slots plus the nodes themselves.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, T + N, D]``, ``v [B, Hkv, T + N, Dv]`` (cache
    slots first, then the N new tokens), ``past_len [B]`` int64, ``tree_mask [B, N, N]``
    bool with a True diagonal (a node sees itself). Returns ``[B, H, N, Dv]``.

    Grouped-query attention: query head ``h`` reads KV head ``h // G`` with
    ``G = H / Hkv`` (what ``repeat_kv`` and ``enable_gqa`` compute). Viewing the queries as
    ``[B, Hkv, G * N, D]`` lets every KV head serve its G query heads in one matmul
    without repeating keys and values in memory.

    Masked scores are ``-inf``, so ``exp`` gives them weight exactly 0: the same weights as
    the dense program, whose additive ``finfo.min`` also underflows to exactly 0 once the
    softmax subtracts the row maximum. That maximum is always a visible score (the
    diagonal), so no row is all ``-inf`` and the softmax never divides 0 by 0.
    """
    batch, heads, new, head_dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    grouped_q = q.reshape(batch, kv_heads, group * new, head_dim)
    scores = (grouped_q @ k.transpose(-1, -2)) * scale  # [B, Hkv, G * N, T + N]
    visible = visible_keys(past_len, tree_mask, total - new)  # [B, N, T + N]
    scores = scores.view(batch, kv_heads, group, new, total)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    weights = scores.softmax(dim=-1).view(batch, kv_heads, group * new, total)
    return (weights @ v).view(batch, heads, new, v.shape[-1])
