"""The Kangaroo adapter recipe: distillation lowers the KL to the model at the exit, and
`trained_adapter` trains into an empty directory, reuses what it saved, and refuses an
adapter trained for another exit layer."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from engines import require_bundled

from leapc.ir.capture import CaptureOptions, capture
from leapc.ir.early_exit import slice_head
from leapc.ir.errors import InputError
from leapc.models import train_adapter as recipe
from leapc.models.loaders import load_source

QUICK = recipe.AdapterTraining(steps=12, sequences=8, eval_sequences=2, context=64)
pytestmark = pytest.mark.slow  # trains on the bundled model
EXIT = 2


@functools.cache
def bundled():
    require_bundled()
    source = load_source("bundled")
    return source, capture(source.model, CaptureOptions(max_seq=128))


def _kl(source, program, adapter, sequences) -> float:
    hidden, teacher = recipe._teacher(source.model, sequences, EXIT)
    with torch.no_grad():
        log_q = F.log_softmax(recipe._Exit(adapter, slice_head(program))(hidden), dim=-1)
    return float((teacher.exp() * (teacher - log_q)).sum(-1).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The recipe run once (both tests need a trained adapter): (adapter, report, the
    directory it trained in)."""
    source, program = bundled()
    work = tmp_path_factory.mktemp("adapter-training")
    adapter, report = recipe.train_adapter(source, program, EXIT, QUICK, work)
    return adapter, report, work


def test_training_lowers_the_kl_to_the_model(trained):
    source, program = bundled()
    adapter, report, work = trained
    sequences = torch.load(work / "train.pt")
    untrained = recipe.KangarooAdapter(recipe.adapter_config(source.model))
    assert _kl(source, program, adapter, sequences) < 0.9 * _kl(source, program, untrained,
                                                                sequences)
    assert report.steps == QUICK.steps and 0 < report.agreement_before < 1


def test_an_adapter_is_trained_once_then_reused_and_refused_for_another_exit(trained, tmp_path,
                                                                             monkeypatch):
    """`trained_adapter` on an empty directory runs the recipe (the fixture's run stands in
    for it: the training itself is the test above's) in a work directory, keeps only the
    adapter, then reuses it."""
    source, program = bundled()
    directory = tmp_path / "adapter"
    calls = []

    def recipe_run(*args):
        calls.append(args)
        args[-1].mkdir(parents=True)  # the recipe's work directory, removed once saved
        return trained[:2]

    monkeypatch.setattr(recipe, "train_adapter", recipe_run)
    first, _ = recipe.trained_adapter(source, program, EXIT, directory, QUICK)
    assert calls == [(source, program, EXIT, QUICK, directory / "training")]
    assert sorted(p.name for p in directory.iterdir()) == ["adapter.json", "adapter.safetensors"]

    def no_training(*args):
        raise AssertionError("the saved adapter should have been reused")

    monkeypatch.setattr(recipe, "train_adapter", no_training)
    again, _ = recipe.trained_adapter(source, program, EXIT, directory, QUICK)
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor)
    with pytest.raises(InputError, match=r"holds an adapter for another model or exit layer "
                                         r"\(exit 2\)"):
        recipe.trained_adapter(source, program, EXIT + 1, directory, QUICK)
