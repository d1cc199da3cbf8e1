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
from leapc.models.train_heads import HeadsTraining, _teacher_batch, heads_loss, train_heads


def periodic_stream(length: int = 6000) -> np.ndarray:
    """Text with structure a head can learn: a repeating walk through 40 tokens."""
    return (3 + (np.arange(length) * 7) % 40).astype(np.int64)


@pytest.mark.parametrize("kind", HeadKind)
def test_training_lowers_the_loss_and_reports_agreement(kind, tmp_path):
    model = tiny_model("llama")
    stream = periodic_stream()
    config = HeadsTraining(HeadsConfig(kind, 3), context=32, batch_size=8, steps=40, lr=3e-3,
                           eval_windows=4)
    x = torch.from_numpy(stream[:8 * 35].reshape(8, 35))
    batch = _teacher_batch(model, x, 3, kind is HeadKind.HYDRA)
    heads, report = train_heads(model, stream[:5000], stream[5000:], config, tmp_path / "w")
    fresh, _ = train_heads(model, stream[:5000], stream[5000:],
                           HeadsTraining(config.heads, steps=0, context=32, eval_windows=4),
                           tmp_path / "fresh")
    with torch.no_grad():
        before, _ = heads_loss(fresh, model, batch)
        after, _ = heads_loss(heads, model, batch)
    assert after < 0.8 * before, (before, after)
    assert report.steps == 40 and len(report.top1) == 3
    assert all(0 <= a <= b <= 1 for a, b in zip(report.top1, report.top5, strict=True))


def test_saved_heads_load_back_identically(tmp_path):
    model = tiny_model("llama")
    stream = periodic_stream()
    config = HeadsTraining(HeadsConfig(HeadKind.HYDRA, 2), context=16, batch_size=2, steps=3,
                           eval_windows=2)
    heads, report = train_heads(model, stream[:5000], stream[5000:], config, tmp_path / "w")
    save_heads(heads, report, tmp_path / "heads")
    loaded, loaded_report = load_heads(tmp_path / "heads", 64)
    assert loaded.config == heads.config and loaded_report == report
    for name, value in heads.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float())


def test_a_directory_without_heads_is_a_user_error(tmp_path):
    with pytest.raises(InputError, match="holds no trained heads"):
        load_heads(tmp_path, 64)
