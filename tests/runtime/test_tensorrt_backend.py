"""The tensorrt backend: optimization profiles from the step signature (checked anywhere),
the compile and token identity (checked where CUDA and torch-tensorrt exist)."""

from __future__ import annotations

import json

import pytest
from engines import tiny_source

import leapc
from leapc.ir.errors import InputError
from leapc.ir.signature import StepSignature
from leapc.runtime.backends.tensorrt import optimization_profiles, require


def test_profiles_span_the_signature_bounds(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama", "ort"))
    signature = StepSignature.from_json(engine.manifest.programs["full"].signature)
    profiles = optimization_profiles(signature)
    layers, kv_heads, head_dim = (engine.manifest.model.dims.num_layers,
                                  engine.manifest.model.dims.num_kv_heads,
                                  engine.manifest.model.dims.head_dim)
    max_seq, max_new = engine.manifest.max_seq, engine.manifest.max_new  # 256, 128
    batch = engine.batch_bound  # 8
    assert profiles["tokens"] == ((1, 1), (1, 8), (batch, max_new))
    assert profiles["past"] == ((layers, 2, 1, kv_heads, 1, head_dim),
                                (layers, 2, 1, kv_heads, max_seq // 2, head_dim),
                                (layers, 2, batch, kv_heads, max_seq - 1, head_dim))
    # T + N: at least 2, never past max-seq (T and N cannot both be at their maximum)
    assert profiles["mask"] == ((1, 1, 2), (1, 8, max_seq // 2 + 8), (batch, max_new, max_seq))


def test_where_it_cannot_run_building_is_refused_in_one_line(tmp_path):
    try:
        require()
    except InputError as refusal:
        with pytest.raises(InputError, match="the tensorrt backend needs"):
            leapc.build(tiny_source("llama"), tmp_path, "tensorrt", max_seq=64)
        assert not (tmp_path / "manifest.json").exists()
        pytest.skip(f"cannot compile with TensorRT here: {refusal}")
    out = leapc.build(tiny_source("llama"), tmp_path / "trt", "tensorrt", max_seq=64)
    reference = leapc.build(tiny_source("llama"), tmp_path / "ort", "ort", max_seq=64)
    prompt = [5, 6, 7, 8, 5, 6]
    ours = leapc.load(out).generate(prompt, 24, policy="lookup").token_ids
    assert ours == leapc.load(reference).generate(prompt, 24).token_ids
    assert json.loads((out / "manifest.json").read_text())["backend"] == "tensorrt"
