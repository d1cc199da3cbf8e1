"""The families beyond the seven (`families.MORE_FAMILIES`): greedy leapc decoding on the
eager and ONNX Runtime engines equals transformers ``generate()`` token for token.

A file of its own so that `pytest --dist loadfile` can run it beside the other engine
tests (each case builds a tiny engine: ~4 s eager, ~9 s ORT on one core)."""

from __future__ import annotations

import pytest
from families import MORE_FAMILIES
from test_greedy_equivalence import BACKENDS, hf_greedy

import leapc


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_more_families_match_hf_generate(engine_dir, family, backend):
    """Past every sliding window (16): 4 prompt tokens and 24 new ones."""
    engine = leapc.load(engine_dir(f"tiny-{family}", backend))
    prompt = [5, 17, 200, 3]
    expected = hf_greedy(f"tiny-{family}", prompt, 24)
    assert engine.generate(prompt, max_new_tokens=24).token_ids == expected
