"""An ORT engine's programs read one copy of their weights (`ort_shared_weights`): stored
once on disk, read once per engine, computed on in place by every session."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import leapc
from leapc.ir.errors import EngineError
from leapc.kernels.ort_ops import compile_library, library_file
from leapc.runtime.backends.ort import OrtStep, session_options
from leapc.runtime.backends.ort_shared_weights import (
    ALIGNMENT,
    INDEX_FILE,
    WEIGHTS_FILE,
    WeightsIndex,
    share_weights,
    shared_weights,
)

RNG = np.random.default_rng(0)
# Elementwise weights: ORT computes on them where they are (its MatMul would repack a
# constant weight into a copy of its own at session creation; leapc's GEMMs do not).
WEIGHT = RNG.standard_normal((32, 64)).astype(np.float32)  # 8 KB: shared
OTHER = RNG.standard_normal((32, 64)).astype(np.float32)  # 8 KB: shared
BIAS = RNG.standard_normal(64).astype(np.float32)  # 256 B: stays inline


def _program(path, weight_name: str, weights: list[np.ndarray], bias: bool = False):
    """``y = x * w_0 * w_1 ... (+ bias)``, the weights named ``<weight_name>_<i>``."""
    names = [f"{weight_name}_{i}" for i in range(len(weights))]
    nodes, current = [], "x"
    for i, name in enumerate(names):
        nodes.append(helper.make_node("Mul", [current, name], [f"h{i}"]))
        current = f"h{i}"
    initializers = [numpy_helper.from_array(w, n) for w, n in zip(weights, names, strict=True)]
    if bias:
        nodes.append(helper.make_node("Add", [current, "bias"], ["y"]))
        initializers.append(numpy_helper.from_array(BIAS, "bias"))
    else:
        nodes.append(helper.make_node("Identity", [current], ["y"]))
    shape = [None, 32, 64]
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def programs(tmp_path):
    """Two programs sharing ``WEIGHT`` under different names, one with a weight of its own."""
    first = _program(tmp_path / "first.onnx", "w", [WEIGHT], bias=True)
    second = _program(tmp_path / "second.onnx", "v", [WEIGHT, OTHER])
    return first, second


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """leapc's custom-op library: a program with it beside takes the shared buffer."""
    return compile_library(tmp_path_factory.mktemp("ops") / "ops.so")


def _with_leapc_kernels(paths, library):
    for path in paths:
        shutil.copyfile(library, library_file(path))
    return paths


def _run(path, x):
    """ORT's own reading of ``path`` (external data included), run on ``x``."""
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


X = RNG.standard_normal((3, 32, 64)).astype(np.float32)


def test_each_distinct_tensor_is_stored_once_on_its_own_page(programs):
    first, second = programs
    before = [_run(p, X) for p in programs]
    data, index_file = share_weights(list(programs))
    index = WeightsIndex.model_validate_json(index_file.read_text())
    assert (data.name, index_file.name) == (WEIGHTS_FILE, INDEX_FILE)
    # WEIGHT once at 0, OTHER on the next page; the bias (under MIN_SHARED_BYTES) stays inline
    assert data.stat().st_size == ALIGNMENT * 2 + OTHER.nbytes
    assert {name: s.offset for name, s in index.programs["first.onnx"].items()} == {"w_0": 0}
    assert {name: s.offset for name, s in index.programs["second.onnx"].items()} == {
        "v_0": 0, "v_1": 2 * ALIGNMENT}
    assert index.programs["second.onnx"]["v_1"].shape == (32, 64)
    raw = np.fromfile(data, np.uint8)
    assert raw[:WEIGHT.nbytes].tobytes() == WEIGHT.tobytes()
    assert raw[2 * ALIGNMENT:].tobytes() == OTHER.tobytes()
    stored = {t.name: t for t in onnx.load(str(first), load_external_data=False).graph.initializer}
    assert stored["w_0"].data_location == TensorProto.EXTERNAL
    assert stored["bias"].data_location == TensorProto.DEFAULT and stored["bias"].raw_data
    # ORT alone reads the rewritten files (its own external-data path) to the same results
    for path, expected in zip(programs, before, strict=True):
        np.testing.assert_array_equal(_run(path, X), expected)


def test_a_programs_own_external_data_is_taken_in_and_removed(tmp_path):
    path = _program(tmp_path / "big.onnx", "w", [WEIGHT])
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, location="big.onnx.data",
                    size_threshold=0)
    share_weights([path])
    assert not (tmp_path / "big.onnx.data").exists()
    np.testing.assert_array_equal(_run(path, X), X * WEIGHT)


def test_sessions_compute_on_one_buffer_in_place(programs, library):
    """Both steps take ``WEIGHT`` from the same memory, and ORT reads that memory at each
    call: writing into the buffer changes what both programs compute."""
    share_weights(_with_leapc_kernels(programs, library))
    first, second = (OrtStep(p) for p in programs)
    assert first.weights is second.weights is shared_weights(programs[0])
    np.testing.assert_array_equal(first(X)["y"], _run(programs[0], X))
    np.testing.assert_array_equal(second(X)["y"], _run(programs[1], X))
    slice_ = first.weights.index.programs["first.onnx"]["w_0"]
    values = (first.weights.initializers("first.onnx")["w_0"],
              second.weights.initializers("second.onnx")["v_0"])
    assert values[0].data_ptr() == values[1].data_ptr() == (
        first.weights.buffer.ctypes.data + slice_.offset)
    first.weights.buffer[:WEIGHT.nbytes].view(np.float32)[:] *= 2
    np.testing.assert_array_equal(first(X)["y"], X * (2 * WEIGHT) + BIAS)
    np.testing.assert_array_equal(second(X)["y"], X * (2 * WEIGHT) * OTHER)


def test_programs_of_ort_kernels_alone_read_the_file_through_ort(programs):
    """ORT's own GEMMs repack constant weights into per-session copies: such programs
    (no leapc kernels beside them) let ORT read the shared file itself."""
    share_weights(list(programs))
    step = OrtStep(programs[0])
    assert step.weights is None
    np.testing.assert_array_equal(step(X)["y"], X * WEIGHT + BIAS)


def test_an_engine_without_shared_weights_loads_as_before(tmp_path, library):
    (path,) = _with_leapc_kernels([_program(tmp_path / "plain.onnx", "w", [WEIGHT])], library)
    step = OrtStep(path)
    assert step.weights is None
    np.testing.assert_array_equal(step(X)["y"], X * WEIGHT)


# ------------------------------------------------------------------ engines


@pytest.mark.slow
def test_a_skip_draft_stores_only_its_own_weights(skip_engine_dir):
    """On a float32 engine the skip draft's GEMM weights are int8 (a draft's may be
    approximate) and stored as such; what it keeps in float32, the embedding table, is the
    full program's copy."""
    engine = skip_engine_dir("tiny-llama")
    manifest = json.loads((engine / "manifest.json").read_text())
    for entry in manifest["programs"].values():
        assert {WEIGHTS_FILE, INDEX_FILE} <= entry["data_files"].keys()
    index = WeightsIndex.model_validate_json((engine / INDEX_FILE).read_text())
    full, draft = (set(index.programs[f"{p}.onnx"].values()) for p in ("full", "skip_0"))
    floats = {s for s in draft if s.onnx_type == TensorProto.FLOAT}
    assert floats and floats <= full
    stored_apart = sum(s.nbytes for tensors in index.programs.values() for s in tensors.values())
    assert (engine / WEIGHTS_FILE).stat().st_size < stored_apart


def test_tampered_shared_weights_are_refused(engine_dir, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(engine_dir("tiny-llama", "ort"), engine)
    data = bytearray((engine / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (engine / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(EngineError, match=f"full program data file {WEIGHTS_FILE} is corrupt"):
        leapc.load(engine)
