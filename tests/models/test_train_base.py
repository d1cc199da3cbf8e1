"""The bundled model's recipe on a toy corpus: split, tokenizer, LayerSkip training, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from leapc.models import corpus
from leapc.models.train_base import (
    TrainConfig,
    layer_states,
    llama_config,
    lr_at,
    per_layer_eval,
    train,
    training_loss,
)

TOY = TrainConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, context=32, batch_size=2, steps=4, warmup=2)


def test_held_out_split_is_a_fixed_function_of_the_path():
    paths = [f"pkg/module_{i}.py" for i in range(2000)]
    held = [p for p in paths if corpus.is_held_out(p)]
    assert 0.03 < len(held) / len(paths) < 0.07
    assert held == [p for p in paths if corpus.is_held_out(p)]


def test_tokenizer_is_byte_level_with_bos_first():
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n"] * 20
    tok = corpus.train_tokenizer(texts, vocab_size=300)
    enc = tok.encode("def g(é):\n")
    assert enc.ids[0] == corpus.SPECIAL_TOKENS.index(corpus.BOS)
    assert tok.decode(enc.ids, skip_special_tokens=True) == "def g(é):\n"
    stream = corpus.encode_documents(tok, texts[:2])
    assert stream.dtype == np.uint16 and (stream == 2).sum() == 2  # one EOS per document


def _toy_work(tmp_path):
    rng = np.random.default_rng(0)
    texts = ["x = 1\n", "def f():\n    pass\n"] * 10
    corpus.train_tokenizer(texts, TOY.vocab_size).save(str(tmp_path / "tokenizer.json"))
    for name in ("train", "eval"):
        np.save(tmp_path / f"{name}.npy", rng.integers(3, TOY.vocab_size, 4000).astype(np.uint16))
    return tmp_path


def test_early_exit_loss_rotates_and_dropped_layers_pass_the_stream_through():
    model = LlamaForCausalLM(llama_config(TOY, 1, 2, 0))
    x = torch.randint(3, TOY.vocab_size, (2, 16))
    states = list(layer_states(model, x, drop=[False, True, False]))
    assert torch.equal(states[0], states[1])  # layer 1 dropped: stream unchanged
    rng = np.random.default_rng(0)
    loss, final = training_loss(model, TOY, x, x, step=0, rng=rng)
    assert loss > final > 0  # the exit loss is added on top of the final loss


def test_lr_warms_up_then_decays_to_min():
    assert lr_at(TOY, 0) < lr_at(TOY, 1) <= TOY.lr
    assert lr_at(TOY, TOY.steps) == pytest.approx(TOY.min_lr)


def test_training_resumes_from_its_checkpoint(tmp_path):
    work = _toy_work(tmp_path)
    model = train(TOY, work)
    saved = torch.load(work / "ckpt.pt", weights_only=False)
    assert saved["state"]["step"] == TOY.steps
    again = train(TOY, work)  # nothing left to do: resumes at the last step
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    losses = per_layer_eval(again, np.load(work / "eval.npy"), TOY.context, windows=2)
    assert len(losses) == TOY.num_layers and all(np.isfinite(losses))
