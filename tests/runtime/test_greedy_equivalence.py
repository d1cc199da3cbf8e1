"""Greedy leapc decoding equals transformers ``generate(do_sample=False)`` token for token.

Each backend's engine is compared with the same Hugging Face output, generated once
(``hf_greedy`` is memoised per model and prompt)."""

from __future__ import annotations

import functools

import pytest
import torch
from engines import STORIES_REFERENCE, require_bundled, require_stories, tiny_source
from families import family_params

import leapc
from leapc.models import corpus
from leapc.models.loaders import load_source

BACKENDS = ("ort", "eager")


@functools.cache
def hf_model(key: str):
    """The Hugging Face model of ``"bundled"``, ``"stories"`` or ``"tiny-<family>"``."""
    if key == "bundled":
        require_bundled()
        return load_source("bundled").model
    if key == "stories":
        return load_source(require_stories()).model
    return tiny_source(key.removeprefix("tiny-")).model


@functools.cache
def _hf_greedy(key: str, prompt_ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    x = torch.tensor([prompt_ids])
    with torch.inference_mode():
        y = hf_model(key).generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=0)
    return tuple(y[0, len(prompt_ids):].tolist())


def hf_greedy(key: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``prompt_ids`` by the model of ``key``."""
    return list(_hf_greedy(key, tuple(prompt_ids), max_new_tokens))


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_stories260k_reproduces_reference_text(engine_dir, backend):
    engine = leapc.load(engine_dir("stories", backend))
    generation = engine.generate("", max_new_tokens=60)
    assert generation.text.strip() == STORIES_REFERENCE
    assert generation.token_ids == hf_greedy("stories", [1], 60)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", family_params())
def test_tiny_family_matches_hf_generate(engine_dir, family, backend):
    engine = leapc.load(engine_dir(f"tiny-{family}", backend))
    for prompt in ([5, 17, 200, 3], [9]):
        expected = hf_greedy(f"tiny-{family}", prompt, 48)
        assert engine.generate(prompt, max_new_tokens=48).token_ids == expected


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bundled_model_matches_hf_generate_on_20_prompts(engine_dir, backend):
    engine = leapc.load(engine_dir("bundled", backend))
    prompts = corpus.held_out_prompts(20)
    assert len(prompts) == 20
    for prompt in prompts:
        ids = engine.encode(prompt)
        expected = hf_greedy("bundled", ids, 64)
        got = engine.generate(prompt, max_new_tokens=64).token_ids
        assert got == expected, prompt
