"""The head-training recipe: it lowers the distillation loss, reports agreement, and the
saved heads load back identically (and refuse a directory that holds none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import tiny_model

from leapc.ir.errors import InputError
from leapc.ir.head_spec import HeadKind, HeadsConfig
from leapc.models.heads import load_heads, save_heads
from leapc.models.train_heads import (
    HeadsTraining,
    _teacher_batch,
    continuations,
    heads_loss,
    train_heads,
)


def periodic_stream(length: int = 6000) -> np.ndarray:
    """Prompts with structure: a repeating walk through 40 tokens."""
    return (3 + (np.arange(length) * 7) % 40).astype(np.int64)


@pytest.mark.slow  # trains twice
@pytest.mark.parametrize("kind", HeadKind)
def test_training_lowers_the_loss_and_reports_agreement(kind, tmp_path):
    model = tiny_model("llama")
    stream = periodic_stream()
    config = HeadsTraining(HeadsConfig(kind, 3), context=32, batch_size=8, steps=80, lr=1e-2,
                           sequences=32, prompt_tokens=8, eval_sequences=4)
    heads, report = train_heads(model, stream[:5000], stream[5000:], config, tmp_path / "w")
    fresh, _ = train_heads(model, stream[:5000], stream[5000:],
                           HeadsTraining(config.heads, steps=0, context=32, sequences=8,
                                         prompt_tokens=8, eval_sequences=4), tmp_path / "fresh")
    held_out = continuations(model, stream[5000:], 8, config, seed=5)
    batch = _teacher_batch(model, held_out, 3, kind is HeadKind.HYDRA)
    with torch.no_grad():
        before, _ = heads_loss(fresh, model, batch)
        after, _ = heads_loss(heads, model, batch)
    assert after < 0.9 * before, (before, after)  # zero-initialised heads: the LM head
    assert report.steps == 80 and len(report.top1) == 3
    assert all(0 <= a <= b <= 1 for a, b in zip(report.top1, report.top5, strict=True))


def test_saved_heads_load_back_identically(tmp_path):
    model = tiny_model("llama")
    stream = periodic_stream()
    config = HeadsTraining(HeadsConfig(HeadKind.HYDRA, 2), context=16, batch_size=2, steps=3,
                           sequences=4, prompt_tokens=8, eval_sequences=2)
    heads, report = train_heads(model, stream[:5000], stream[5000:], config, tmp_path / "w")
    save_heads(heads, report, tmp_path / "heads")
    loaded, loaded_report = load_heads(tmp_path / "heads", 64)
    assert loaded.config == heads.config and loaded_report == report
    for name, value in heads.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float())


def test_a_directory_without_heads_is_a_user_error(tmp_path):
    with pytest.raises(InputError, match="holds no trained heads"):
        load_heads(tmp_path, 64)
