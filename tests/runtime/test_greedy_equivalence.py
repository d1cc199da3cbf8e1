"""Greedy leapc decoding equals transformers ``generate(do_sample=False)`` token for token."""

from __future__ import annotations

import pytest
import torch
from engines import STORIES_REFERENCE, require_bundled, require_stories, tiny_source
from families import FAMILIES

import leapc
from leapc.models import corpus
from leapc.models.loaders import load_source

BACKENDS = ("ort", "eager")


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    x = torch.tensor([prompt_ids])
    with torch.inference_mode():
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=max_new_tokens, pad_token_id=0)
    return y[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stories260k_reproduces_reference_text(engine_dir, backend):
    path = require_stories()
    engine = leapc.load(engine_dir("stories", backend))
    generation = engine.generate("", max_new_tokens=60)
    assert generation.text.strip() == STORIES_REFERENCE
    assert generation.token_ids == hf_greedy(load_source(path).model, [1], 60)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_matches_hf_generate(engine_dir, family, backend):
    engine = leapc.load(engine_dir(f"tiny-{family}", backend))
    model = tiny_source(family).model
    for prompt in ([5, 17, 200, 3], [9]):
        expected = hf_greedy(model, prompt, 48)
        assert engine.generate(prompt, max_new_tokens=48).token_ids == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_bundled_model_matches_hf_generate_on_20_prompts(engine_dir, backend):
    require_bundled()
    engine = leapc.load(engine_dir("bundled", backend))
    source = load_source("bundled")
    prompts = corpus.held_out_prompts(20)
    assert len(prompts) == 20
    for prompt in prompts:
        ids = engine.encode(prompt)
        expected = hf_greedy(source.model, ids, 64)
        got = engine.generate(prompt, max_new_tokens=64).token_ids
        assert got == expected, prompt
