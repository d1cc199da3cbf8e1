"""The families beyond the seven (`families.MORE_FAMILIES`): greedy leapc decoding on the
eager and ONNX Runtime engines equals transformers ``generate()`` token for token.

A file of its own so that `pytest --dist loadfile` can run it beside the other engine
tests (each case builds a tiny engine: ~4 s eager, ~9 s ORT on one core)."""

from __future__ import annotations

import pytest
from engines import tiny_source
from families import MORE_FAMILIES
from test_greedy_equivalence import BACKENDS, hf_greedy

import leapc

PROMPT = [5, 17, 200, 3]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_more_families_match_hf_generate(engine_dir, family, backend):
    """Past every sliding window (16): 4 prompt tokens and 24 new ones."""
    engine = leapc.load(engine_dir(f"tiny-{family}", backend))
    expected = hf_greedy(f"tiny-{family}", PROMPT, 24)
    assert engine.generate(PROMPT, max_new_tokens=24).token_ids == expected


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["invariant", "kernel"])
def test_soft_capping_in_the_width_invariant_lowerings(tmp_path, attention):
    """The ONNX width-invariant lowering and leapc's kernel soft-cap too (on a Gemma 2 of
    full layers: both refuse sliding windows)."""
    if attention == "kernel" and "avx512_vnni" not in open("/proc/cpuinfo").read():
        pytest.skip("leapc's ORT ops need a CPU with AVX512-VNNI")
    leapc.build(tiny_source("gemma2_full"), tmp_path / "engine", "ort", max_seq=256,
                attention=attention)
    engine = leapc.load(tmp_path / "engine")
    expected = hf_greedy("tiny-gemma2_full", PROMPT, 24)
    assert engine.generate(PROMPT, max_new_tokens=24).token_ids == expected
