"""`fuse_sibling_projections`: the projections of one input become one MatMul and a Split."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import leapc
from leapc.runtime.backends.onnx_fuse_projections import fuse_sibling_projections
from leapc.runtime.backends.onnx_graph import transpose_constant_weights
from leapc.runtime.backends.ort import quantize_weights, session_options

WIDTHS = {"q": 8, "k": 4, "v": 4}


def _before() -> onnx.ModelProto:
    """``x`` projected three times (a layer's queries, keys and values), then a fourth
    MatMul whose weight is another node's output (not fused), and one of ``y``'s alone."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, w)).astype(np.float32), f"w{n}")
             for n, w in WIDTHS.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "wy"))
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [n], name=f"proj_{n}") for n in WIDTHS]
    nodes += [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
              helper.make_node("MatMul", ["x", "xt"], ["gram"]),
              helper.make_node("MatMul", ["y", "wy"], ["alone"])]
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32]),
                         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
         for n in [*WIDTHS, "gram", "alone"]], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "y": x})


def test_siblings_become_one_matmul_and_a_split():
    model = _before()
    assert fuse_sibling_projections(model) == 1
    ops = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert ops[:2] == [("MatMul", ["x", "proj_q.fused_weight"], ["proj_q.fused"]),
                       ("Split", ["proj_q.fused", "proj_q.fused_split"], ["q", "k", "v"])]
    assert [op for op, _, _ in ops[2:]] == ["Transpose", "MatMul", "MatMul"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["proj_q.fused_weight"].shape == (32, 16)
    assert inits["proj_q.fused_split"].tolist() == [8, 4, 4]
    assert not {"wq", "wk", "wv"} & set(inits)


def test_the_fused_program_computes_the_same_projections():
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    before, after = _before(), _before()
    fuse_sibling_projections(after)
    for ours, reference in zip(_run(after, x), _run(before, x), strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)


def test_int8_quantization_of_the_fused_weight_is_bit_identical(tmp_path):
    """Weight-only int8 quantizes each column's blocks on their own: fused or not, the
    quantized projections are the same numbers."""
    x = np.random.default_rng(2).standard_normal((5, 32)).astype(np.float32)
    results = []
    for fuse in (False, True):
        model = _before()
        if fuse:
            fuse_sibling_projections(model)
        path = tmp_path / f"fused{fuse}.onnx"
        onnx.save(model, path)
        quantize_weights(path)
        results.append(_run(onnx.load(path), x))
    for ours, reference in zip(*results, strict=True):
        np.testing.assert_array_equal(ours, reference)


def test_a_quantized_engine_projects_each_layer_twice_fused(engine_dir):
    """On int8 the fused projections' Splits are folded further: q/k/v's into the attention
    block, gate/up's into the SwiGLU before the down projection."""
    engine = leapc.load(engine_dir("tiny-llama", "ort", "int8"))
    model = onnx.load(str(engine.path / "full.onnx"))
    readers = {name: node.op_type for node in model.graph.node for name in node.input}
    projections = [readers[n.output[0]] for n in model.graph.node
                   if n.op_type == "RMSNormQ8MatMul" and n.output[0] in readers]
    layers = engine.manifest.model.dims.num_layers
    assert sorted(projections) == ["RotaryTreeAttention"] * layers + ["SwiGLUQ8MatMul"] * layers
    unquantized = onnx.load(str(engine_dir("tiny-llama") / "full.onnx"))
    assert not any(n.op_type == "Split" for n in unquantized.graph.node)


def _two_calls() -> onnx.ModelProto:
    """An unrolled chain's shape: ``x`` and ``y`` (two calls' activations) projected by the
    same q and k weights, each through its own ``Transpose`` of the stored ``[out, in]``
    weight, as the exporter leaves a ``linear`` whose weight is read twice."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((w, 32)).astype(np.float32), f"w{n}")
             for n, w in (("q", 8), ("k", 4))]
    nodes = []
    for call in ("x", "y"):
        for n in ("q", "k"):
            nodes += [helper.make_node("Transpose", [f"w{n}"], [f"{call}_t{n}"], perm=[1, 0]),
                      helper.make_node("MatMul", [call, f"{call}_t{n}"], [f"{call}_{n}"],
                                       name=f"{call}_proj_{n}")]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info(c, TensorProto.FLOAT, ["N", 32])
                         for c in ("x", "y")],
        [helper.make_tensor_value_info(f"{c}_{n}", TensorProto.FLOAT, None)
         for c in ("x", "y") for n in ("q", "k")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_unrolled_chains_calls_share_one_transposed_and_fused_weight():
    x = np.random.default_rng(4).standard_normal((5, 32)).astype(np.float32)
    before, after = _two_calls(), _two_calls()
    transpose_constant_weights(after.graph)
    assert not any(n.op_type == "Transpose" for n in after.graph.node)
    assert sorted(i.name for i in after.graph.initializer) == ["wk.transposed", "wq.transposed"]
    assert fuse_sibling_projections(after) == 2
    inits = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    assert sorted(inits) == ["x_proj_q.fused_split", "x_proj_q.fused_weight"]
    assert inits["x_proj_q.fused_weight"].shape == (32, 12)
    fused = [n for n in after.graph.node if n.op_type == "MatMul"]
    assert [n.input[1] for n in fused] == ["x_proj_q.fused_weight"] * 2
    for ours, reference in zip(_run(after, x), _run(before, x), strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
