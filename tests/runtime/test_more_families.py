"""The families beyond the seven (`families.MORE_FAMILIES`): greedy leapc decoding on the
ONNX Runtime engine (and the eager one, for `families.EAGER_FAMILIES`) equals transformers
``generate()`` token for token.

A file of its own so that `pytest --dist loadfile` can run it beside the other engine
tests (each case builds a tiny engine: ~4 s eager, ~9 s ORT on one core)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from engines import TRAINING_FREE, tiny_source
from families import EAGER_FAMILIES, MORE_FAMILIES, SMALL_WINDOW
from test_greedy_equivalence import hf_greedy

import leapc

PROMPT = [5, 17, 200, 3]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "backend"), [(f, "ort") for f in sorted(MORE_FAMILIES)]
                         + [(f, "eager") for f in EAGER_FAMILIES])
def test_more_families_match_hf_generate(engine_dir, family, backend):
    """Past every sliding window (16): 4 prompt tokens and 24 new ones."""
    engine = leapc.load(engine_dir(f"tiny-{family}", backend))
    expected = hf_greedy(f"tiny-{family}", PROMPT, 24)
    assert engine.generate(PROMPT, max_new_tokens=24).token_ids == expected


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["invariant", "kernel"])
def test_soft_capping_in_the_width_invariant_lowerings(tmp_path, attention):
    """The ONNX width-invariant lowering and leapc's kernel soft-cap too (on a Gemma 2 of
    full layers; windows: below)."""
    _needs_kernel_cpu(attention)
    leapc.build(tiny_source("gemma2_full"), tmp_path / "engine", "ort", max_seq=256,
                attention=attention)
    engine = leapc.load(tmp_path / "engine")
    expected = hf_greedy("tiny-gemma2_full", PROMPT, 24)
    assert engine.generate(PROMPT, max_new_tokens=24).token_ids == expected


def _needs_kernel_cpu(attention: str) -> None:
    if attention == "kernel" and "avx512_vnni" not in open("/proc/cpuinfo").read():
        pytest.skip("leapc's ORT ops need a CPU with AVX512-VNNI")


def _windows(engine) -> list:
    """The ``window`` attribute of each attention node of the engine's ``full`` program
    (None: the node has none)."""
    nodes = onnx.load(str(engine.path / "full.onnx")).graph.node
    return [next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "window"),
                 None) for n in nodes if n.op_type in ("TreeAttention", "RotaryTreeAttention")]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "attention", "windows"), [
    ("mistral_window", "invariant", None),
    ("mistral_window", "kernel", [SMALL_WINDOW] * 2),
    ("gemma2", "kernel", [SMALL_WINDOW, None]),  # a window and a soft cap in one node
])
def test_sliding_windows_in_the_width_invariant_lowerings(tmp_path, family, attention, windows):
    """Windowed layers are tree attention with their window there (once refused): greedy
    output past the window (16) equals generate(); on the kernel, each windowed layer's
    node carries the window."""
    _needs_kernel_cpu(attention)
    engine = leapc.load(leapc.build(tiny_source(family), tmp_path / "engine", "ort",
                                    max_seq=256, attention=attention))
    if windows:
        assert _windows(engine) == windows
    expected = hf_greedy(f"tiny-{family}", PROMPT, 24)
    assert engine.generate(PROMPT, max_new_tokens=24).token_ids == expected


@pytest.mark.slow
def test_a_windowed_int8_engine_drafts_token_identical_to_its_ar(tmp_path):
    """--quantize int8 (leapc's kernel) builds a windowed model and offers the drafting
    policies, each emitting its own `ar`'s tokens on prompts past the window."""
    _needs_kernel_cpu("kernel")
    engine = leapc.load(leapc.build(tiny_source("mistral_window"), tmp_path / "engine", "ort",
                                    max_seq=256, quantize="int8"))
    assert _windows(engine) == [SMALL_WINDOW] * 2
    offered = {p.value for p in engine.manifest.policies}
    assert set(TRAINING_FREE) <= offered
    rng = np.random.default_rng(0)
    for prompt in ((PROMPT * 12)[:40], rng.integers(3, 250, 30).tolist()):
        ar = engine.generate(prompt, 40).token_ids
        for policy in sorted(offered - {"ar"}):
            assert engine.generate(prompt, 40, policy=policy).token_ids == ar, policy
