"""Kangaroo's adapter: its KV rows let a sequence be fed in pieces, and untrained it is the
plain exit (the model's final norm removes the scale its output norm leaves)."""

from __future__ import annotations

import torch

from leapc.ir.adapter import AdapterConfig, KangarooAdapter

CONFIG = AdapterConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)


def _causal(past: int, new: int, batch: int = 2) -> torch.Tensor:
    mask = torch.cat([torch.ones(new, past, dtype=torch.bool),
                      torch.ones(new, new, dtype=torch.bool).tril()], dim=1)
    return mask.expand(batch, new, past + new)


def _trained() -> KangarooAdapter:
    torch.manual_seed(0)
    adapter = KangarooAdapter(CONFIG)
    torch.nn.init.normal_(adapter.o_proj.weight, std=0.2)
    return adapter.eval()


def test_feeding_a_sequence_in_pieces_equals_feeding_it_whole():
    adapter, hidden = _trained(), torch.randn(2, 7, CONFIG.hidden_size)
    positions = torch.arange(7).expand(2, 7)
    empty = torch.zeros(1, 2, 2, CONFIG.num_kv_heads, 0, CONFIG.head_dim)
    with torch.no_grad():
        whole, rows = adapter(hidden, positions, empty, _causal(0, 7))
        first, past = adapter(hidden[:, :4], positions[:, :4], empty, _causal(0, 4))
        second, new_rows = adapter(hidden[:, 4:], positions[:, 4:], past, _causal(4, 3))
    assert rows.shape == (1, 2, 2, CONFIG.num_kv_heads, 7, CONFIG.head_dim)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(torch.cat([past, new_rows], dim=4), rows)


def test_masked_slots_are_not_read():
    """A slot the mask leaves out may hold anything (a rejected draft's scratch row)."""
    adapter, hidden = _trained(), torch.randn(2, 1, CONFIG.hidden_size)
    past = torch.randn(1, 2, 2, CONFIG.num_kv_heads, 5, CONFIG.head_dim)
    mask = _causal(5, 1).clone()
    mask[..., 3] = False
    noisy = past.clone()
    noisy[..., 3, :] = 1e4
    positions = torch.full((2, 1), 5)
    with torch.no_grad():
        torch.testing.assert_close(adapter(hidden, positions, past, mask)[0],
                                   adapter(hidden, positions, noisy, mask)[0])


def test_untrained_adapter_only_normalises():
    adapter, hidden = KangarooAdapter(CONFIG), torch.randn(2, 3, CONFIG.hidden_size)
    empty = torch.zeros(1, 2, 2, CONFIG.num_kv_heads, 0, CONFIG.head_dim)
    with torch.no_grad():
        out, _ = adapter(hidden, torch.arange(3).expand(2, 3), empty, _causal(0, 3))
    rms = hidden.pow(2).mean(-1, keepdim=True).add(CONFIG.eps).rsqrt()
    torch.testing.assert_close(out, hidden * rms)
