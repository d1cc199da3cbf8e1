"""The block-diffusion recipe's objective: attention pattern, noise, targets, and that a
few steps on a tiny model lower the masked-token loss."""

from __future__ import annotations

import numpy as np
import torch
from families import tiny_model

from leapc.models.train_diffusion import (
    DiffusionConfig,
    add_noise,
    diffusion_targets,
    training_loss,
    training_mask,
)

MASK = 0


def test_training_mask_is_causal_clean_then_block_bidirectional_noisy():
    attend = training_mask(context=6, block_size=3).int()
    expected = torch.tensor([
        # clean 0..5 (causal)      noisy 0..5
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        # noisy block 0 sees no clean token and its own block
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        # noisy block 1 sees clean 0..2 (the prefix before it) and its own block
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1],
    ])
    assert torch.equal(attend, expected)


def test_noise_masks_whole_blocks_at_one_rate_each():
    cfg = DiffusionConfig(block_size=8, context=64, min_mask_rate=0.05)
    x = torch.arange(3, 3 + 64).repeat(400, 1)
    noisy, masked = add_noise(x, cfg, MASK, np.random.default_rng(0))
    assert torch.equal(noisy == MASK, masked) and torch.equal(noisy[~masked], x[~masked])
    rates = masked.view(400, 8, 8).float().mean(-1)
    assert 0.45 < rates.mean() < 0.60  # E[t] for t ~ U(0.05, 1) is 0.525
    # one rate per block: the within-block spread is binomial, not the across-block one
    assert rates.std() > 0.25


def test_targets_are_the_next_masked_token_of_the_same_block():
    x = torch.tensor([[10, 11, 12, 13, 14, 15]])
    masked = torch.tensor([[True, True, False, True, True, True]])
    target = diffusion_targets(x, masked, block_size=3)
    # position i predicts x[i + 1] when that token is masked and in i's block; a block's
    # first token (positions 0 and 3) is the clean prefix's prediction, never a target here
    assert target.tolist() == [[11, -100, -100, 14, 15, -100]]


def test_a_few_steps_lower_the_masked_token_loss():
    model = tiny_model("llama").train()
    cfg = DiffusionConfig(block_size=4, context=16, batch_size=8)
    attend = training_mask(cfg.context, cfg.block_size)
    rng = np.random.default_rng(0)
    x = torch.randint(3, 40, (cfg.batch_size, cfg.context), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, diffusion, _ = training_loss(model, cfg, x, MASK, attend, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(diffusion.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
