"""``torch.ops.leapc.capped_attention``: SDPA with soft-capped logits (Gemma 2).

Attention logit soft-capping bounds every score before the mask and softmax,
``s -> cap * tanh(s / cap)``. SDPA has no such step (transformers' SDPA function refuses
a ``softcap``), so `ir.capture` runs these layers through its own attention function,
which emits this op: one node per layer that carries the cap as an argument, for the anatomy
to find as the layer's attention and `insert_tree_attention` to carry over to
``leapc.tree_attention``. It is declared here, not in ``leapc.kernels``, because capture
emits it and ``ir`` does not import ``kernels``; its ONNX translation is in
`leapc.kernels.onnx_translations`.
"""

from __future__ import annotations

import torch


def soft_cap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(scores / cap)``; a cap of 0 leaves the scores as they are."""
    return cap * torch.tanh(scores / cap) if cap else scores


def capped_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """``query [B, H, N, D]``, ``key [B, Hkv, S, D]``, ``value [B, Hkv, S, Dv]``, an additive
    ``attn_mask`` broadcastable to ``[B, H, N, S]`` -> ``[B, H, N, Dv]``: the op's
    definition (AOTInductor compiles it as these aten ops). Arguments are named as SDPA's,
    so a pass reads both ops' calls alike.

    Query head h reads KV head h // G (as SDPA's ``enable_gqa``); the cap applies before
    the mask (a capped ``finfo.min`` would leave masked keys a weight); the softmax runs in
    float32, as transformers' eager attention runs it.
    """
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = soft_cap((query @ key.transpose(-1, -2)) * scale, softcap) + attn_mask
    return scores.float().softmax(dim=-1).to(query.dtype) @ value


capped_attention = torch.library.custom_op("leapc::capped_attention", mutates_args=())(capped_sdpa)


@capped_attention.register_fake
def _(query, key, value, attn_mask, scale, softcap):
    return query.new_empty(*query.shape[:3], value.shape[-1])

