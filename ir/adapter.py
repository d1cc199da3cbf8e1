"""Kangaroo's adapter: one attention block and two norms between an early exit and the LM head.

The exit's hidden state ``h`` (the residual stream entering layer E) is a poor input for
the final norm and LM head, which were trained on the last layer's output. The adapter
(Kangaroo, Liu et al. 2024) learns the difference with attention only, no MLP:

    a = h + W_o · Attention(RoPE(W_q · n1(h)), RoPE(W_k · n1(h)), W_v · n1(h))
    adapted = n2(a)

after which the model's own final norm and LM head give the draft logits. ``W_o`` starts at
zero and ``n2`` at one, so an untrained adapter is the plain early exit (up to the scale
the final norm removes anyway). The attention has its own KV cache: one extra layer of the
target's shape, ``past``/``present`` ``[1, 2, B, Hkv, T|N, Dh]``, with the step contract's
mask (slots, then the new tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AdapterConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    eps: float = 1e-5

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> AdapterConfig:
        return cls(**data)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_angles(positions: torch.Tensor, head_dim: int,
                  theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[B, 1, N, D]`` of rotary embedding at ``positions [B, N]``: each
    frequency twice, as Hugging Face Llama builds them (the form the ONNX exporter fuses
    into ``RotaryEmbedding``)."""
    half = head_dim // 2
    inv_freq = theta ** -(torch.arange(half, dtype=torch.float32, device=positions.device)
                          / half)
    freqs = positions[:, :, None].float() * inv_freq  # [B, N, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x [B, H, N, D]``: the pair (i, i + D/2)
    turns by the angle of frequency i."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """``q [B, H, N, D]`` over ``keys``/``values [B, Hkv, T + N, D]`` under the step mask
    ``[B, N, T + N]``, grouped-query (query head h reads KV head h // (H / Hkv)): what
    training differentiates, and right under any mask, not only the runtime's
    prefix-valid ones."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = q @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, N, T + N]
    scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1) @ values


class KangarooAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        c = config
        self.config = c
        self.norm_in = RMSNorm(c.hidden_size, c.eps)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.norm_out = RMSNorm(c.hidden_size, c.eps)
        nn.init.zeros_(self.o_proj.weight)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, count, self.config.head_dim).transpose(1, 2)  # [B, H, N, D]

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, past: torch.Tensor,
                mask: torch.Tensor, attend: Attend = dense_attention
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [B, N, H]``, ``past [1, 2, B, Hkv, T, Dh]``, ``mask [B, N, T + N]`` ->
        (adapted ``[B, N, H]``, present ``[1, 2, B, Hkv, N, Dh]``). ``attend`` computes the
        attention: `dense_attention`, or in a lowered program the step's own kernel."""
        c = self.config
        x = self.norm_in(hidden)
        cos, sin = rotary_angles(positions, c.head_dim, c.rope_theta)
        q = rotate(self._heads(self.q_proj(x), c.num_heads), cos, sin)
        k = rotate(self._heads(self.k_proj(x), c.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), c.num_kv_heads)
        keys = torch.cat([past[0, 0], k], dim=2)
        values = torch.cat([past[0, 1], v], dim=2)
        attended = attend(q, keys, values, mask)  # [B, H, N, D]
        b, _, n, _ = attended.shape
        out = hidden + self.o_proj(attended.transpose(1, 2).reshape(b, n, -1))
        return self.norm_out(out), torch.stack([k, v])[None]
