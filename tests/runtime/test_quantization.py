"""`leapc build --quantize int8`: MatMul weights stored as int8 (ORT MatMulNBits)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from engines import tiny_source

import leapc
from leapc.ir.errors import InputError
from leapc.runtime.manifest import Quantization
from leapc.runtime.policies import Policy

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]


@pytest.fixture(scope="module")
def int8_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-int8")
    return leapc.load(leapc.build(tiny_source("llama"), out, "ort", max_seq=256, quantize="int8"))


@pytest.mark.slow  # the int8 engine: a build of its own
def test_every_constant_matmul_becomes_matmulnbits(int8_engine):
    graph = onnx.load(str(int8_engine.path / "full.onnx")).graph
    weights = {init.name for init in graph.initializer}
    ops = [node.op_type for node in graph.node]
    assert int8_engine.manifest.quantization is Quantization.INT8
    assert ops.count("MatMulNBits") >= 7 * 2  # q, k, v, o, gate, up, down in each layer
    float_weight_matmuls = [n for n in graph.node
                            if n.op_type == "MatMul" and n.input[1] in weights]
    assert not float_weight_matmuls


@pytest.mark.slow
def test_int8_logits_stay_close_to_float32(int8_engine, engine_dir):
    full = leapc.load(engine_dir("tiny-llama", "ort"))
    ours, reference = (e.generate(PROMPT, 1) for e in (int8_engine, full))
    assert ours.token_ids == reference.token_ids
    inputs = _prefill_inputs(full)
    exact = full.step(*inputs)["logits"]
    rounded = int8_engine.step(*inputs)["logits"]
    assert np.abs(rounded - exact).max() < 0.05 * np.abs(exact).max()
    assert np.abs(rounded - exact).max() > 0  # the weights really changed


@pytest.mark.slow
def test_int8_engines_decode_autoregressively_only(int8_engine):
    """Drafting policies would not reproduce `ar` there (see docs/decisions.md)."""
    assert int8_engine.manifest.policies == (Policy.AR,)
    with pytest.raises(InputError, match="does not support policy 'lookup'"):
        int8_engine.generate(PROMPT, 8, policy="lookup")


def test_quantizing_needs_the_ort_backend(tmp_path):
    with pytest.raises(InputError, match="--quantize int8 needs the ort backend"):
        leapc.build(tiny_source("llama"), tmp_path, "eager", quantize="int8")
    with pytest.raises(InputError, match="unknown quantization 'int3'"):
        leapc.build(tiny_source("llama"), tmp_path, "ort", quantize="int3")


def _prefill_inputs(engine):
    from leapc.runtime.decode import tree_inputs
    from leapc.runtime.drafters.base import Draft
    cache = engine.new_cache()
    return tree_inputs(cache, Draft.chain_of(PROMPT[0], PROMPT[1:]))
