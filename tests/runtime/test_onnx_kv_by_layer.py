"""`split_past_by_layer` / `split_present_by_layer`: the ONNX step program takes each
layer's keys and values as inputs of their own (views of the runtime's cache), not the
whole ``past`` it would copy, and returns each layer's new rows without stacking them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import leapc
from leapc.ir.errors import GraphError
from leapc.runtime.backends.onnx_kv_by_layer import split_past_by_layer, split_present_by_layer
from leapc.runtime.backends.ort import _feed_plan, _output_plan, _stack_layers, session_options

LAYERS = 2


def _before(cache: str = "past") -> onnx.ModelProto:
    """What the exporter emits: ``past[l][kv]`` by two Gathers, concatenated with the new
    rows; T read from ``past``'s shape. ``cache``: the input's name."""
    nodes, inits = [], [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in range(2)]
    outputs = []
    for layer in range(LAYERS):
        inits.append(numpy_helper.from_array(np.array(layer, np.int64), f"layer{layer}"))
        nodes.append(helper.make_node("Gather", [cache, f"layer{layer}"], [f"sel{layer}"], axis=0))
        for kv in range(2):
            nodes.append(helper.make_node("Gather", [f"sel{layer}", f"i{kv}"],
                                          [f"kv{layer}{kv}"], axis=0))
            nodes.append(helper.make_node("Concat", [f"kv{layer}{kv}", "new"],
                                          [f"out{layer}{kv}"], axis=2))
            outputs.append(f"out{layer}{kv}")
    nodes.append(helper.make_node("Shape", [cache], ["length"], start=4, end=5))
    past = helper.make_tensor_value_info(cache, TensorProto.FLOAT, [LAYERS, 2, 1, 2, "T", 4])
    new = helper.make_tensor_value_info("new", TensorProto.FLOAT, [1, 2, "N", 4])
    graph = helper.make_graph(
        nodes, "step", [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "N"]),
                        past, new],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
        + [helper.make_tensor_value_info("length", TensorProto.INT64, [1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


@pytest.mark.parametrize("cache", ["past", "adapter_past"])
def test_past_becomes_one_input_per_layer_and_kv_in_its_place(cache):
    model = _before(cache)
    split_past_by_layer(model, cache)
    assert [v.name for v in model.graph.input] == \
        ["tokens", *(f"{cache}.{layer}.{kv}" for layer in range(2) for kv in range(2)), "new"]
    dims = [d.dim_value or d.dim_param for d in model.graph.input[1].type.tensor_type.shape.dim]
    assert dims == [1, 2, "T", 4]
    assert [n.op_type for n in model.graph.node] == ["Concat"] * 4 + ["Shape"]
    shape = model.graph.node[-1]
    assert shape.input[0] == f"{cache}.0.0"
    assert {a.name: a.i for a in shape.attribute} == {"start": 2, "end": 3}


def test_the_split_program_computes_what_the_whole_past_did():
    rng = np.random.default_rng(0)
    past = rng.standard_normal((LAYERS, 2, 1, 2, 7, 4)).astype(np.float32)
    feeds = {"tokens": np.zeros((1, 3), np.int64), "past": past,
             "new": rng.standard_normal((1, 2, 3, 4)).astype(np.float32)}
    before, after = _before(), _before()
    split_past_by_layer(after)
    feeds |= {f"past.{i}.{kv}": past[i, kv] for i in range(LAYERS) for kv in range(2)}
    for ours, reference in zip(_run(after, feeds), _run(before, feeds), strict=True):
        np.testing.assert_array_equal(ours, reference)


def test_another_reader_of_past_is_an_internal_error_naming_the_rewrite():
    model = _before()
    model.graph.node.append(helper.make_node("ReduceSum", ["past"], ["total"]))
    with pytest.raises(GraphError, match="^split_past_by_layer: past is read by ReduceSum"):
        split_past_by_layer(model)


def test_the_feed_plan_maps_parts_to_their_signature_input():
    assert _feed_plan(["tokens", "positions", "past.0.0", "past.0.1", "past.1.0", "mask"]) == [
        ("tokens", 0, None), ("positions", 1, None), ("past.0.0", 2, (0, 0)),
        ("past.0.1", 2, (0, 1)), ("past.1.0", 2, (1, 0)), ("mask", 3, None)]


def test_an_ort_engines_step_takes_each_layers_keys_and_values(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    model = onnx.load(str(engine.path / "full.onnx"))
    names = [v.name for v in model.graph.input]
    layers = engine.manifest.model.dims.num_layers
    assert names == ["tokens", "positions"] + \
        [f"past.{i}.{kv}" for i in range(layers) for kv in range(2)] + ["mask"]
    assert not any(n.op_type == "Gather" and "past" in n.input[0] for n in model.graph.node)
    assert [v.name for v in model.graph.output] == ["logits"] + \
        [f"present.{i}.{kv}" for i in range(layers) for kv in range(2)]
    assert engine.program("full").output_names == ("logits", "present")


def _stacking(rows_by_layer=None) -> onnx.ModelProto:
    """What the exporter emits for ``present``: each layer's keys and values (here ``k<l>``
    = ``x + l``, ``v<l>`` = ``x - l``) stacked, then the layers stacked, by ``Unsqueeze``
    at axis 0 and ``Concat``."""
    inits = [numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes, layers = [], []
    for layer in range(LAYERS):
        inits.append(numpy_helper.from_array(np.array(layer, np.float32), f"c{layer}"))
        pair = []
        for kv, op in enumerate(("Add", "Sub")):
            nodes.append(helper.make_node(op, ["x", f"c{layer}"], [f"row{layer}{kv}"]))
            nodes.append(helper.make_node("Unsqueeze", [f"row{layer}{kv}", "axis0"],
                                          [f"u{layer}{kv}"]))
            pair.append(f"u{layer}{kv}")
        nodes.append(helper.make_node("Concat", pair, [f"stack{layer}"], axis=0))
        nodes.append(helper.make_node("Unsqueeze", [f"stack{layer}", "axis0"], [f"s{layer}"]))
        layers.append(f"s{layer}")
    nodes.append(helper.make_node("Concat", layers, ["present"], axis=0))
    nodes.append(helper.make_node("Neg", ["x"], ["logits"]))
    graph = helper.make_graph(
        nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present", TensorProto.FLOAT, [LAYERS, 2, 1, 2, "N", 4])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_present_becomes_one_output_per_layer_and_kv_without_the_stacking():
    model = _stacking()
    split_present_by_layer(model)
    assert [v.name for v in model.graph.output] == \
        ["logits", "present.0.0", "present.0.1", "present.1.0", "present.1.1"]
    dims = [d.dim_value or d.dim_param for d in model.graph.output[1].type.tensor_type.shape.dim]
    assert dims == [1, 2, "N", 4]
    assert [n.op_type for n in model.graph.node] == ["Add", "Sub", "Add", "Sub", "Neg"]


def test_the_stacked_parts_are_the_whole_present():
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)
    before, after = _stacking(), _stacking()
    split_present_by_layer(after)
    logits, present = _run(before, {"x": x})
    results = _run(after, {"x": x})
    plan = _output_plan([v.name for v in after.graph.output])
    assert plan == [("logits", 0), ("present", slice(1, 5))]
    np.testing.assert_array_equal(results[0], logits)
    np.testing.assert_array_equal(_stack_layers(results, plan[1][1]), present)


def test_a_present_made_another_way_is_left_whole():
    model = _stacking()
    model.graph.node.append(helper.make_node("Identity", ["stack0"], ["peek"]))
    model.graph.output.append(helper.make_tensor_value_info("peek", TensorProto.FLOAT, None))
    split_present_by_layer(model)
    assert [v.name for v in model.graph.output] == ["logits", "present", "peek"]


def test_a_row_that_is_also_an_output_keeps_its_name():
    model = _stacking()
    model.graph.output.append(helper.make_tensor_value_info("row00", TensorProto.FLOAT, None))
    split_present_by_layer(model)
    x = np.ones((1, 2, 3, 4), np.float32)
    results = dict(zip([v.name for v in model.graph.output], _run(model, {"x": x}), strict=True))
    np.testing.assert_array_equal(results["row00"], results["present.0.0"])


def _one_layer_stack() -> onnx.ModelProto:
    """Kangaroo's adapter rows as the exporter emits them: one layer's keys (``2 x``) and
    values (``-x``) stacked, and that stack unsqueezed (a stack of one layer, no Concat)."""
    inits = [numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("Add", ["x", "x"], ["k"]),
             helper.make_node("Neg", ["x"], ["v"]),
             helper.make_node("Unsqueeze", ["k", "axis0"], ["uk"]),
             helper.make_node("Unsqueeze", ["v", "axis0"], ["uv"]),
             helper.make_node("Concat", ["uk", "uv"], ["pair"], axis=0),
             helper.make_node("Unsqueeze", ["pair", "axis0"], ["adapter_present"])]
    graph = helper.make_graph(
        nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "N", 4])],
        [helper.make_tensor_value_info("adapter_present", TensorProto.FLOAT,
                                       [1, 2, 1, 2, "N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_one_layer_stack_under_another_name_is_split_too():
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)
    before, after = _one_layer_stack(), _one_layer_stack()
    split_present_by_layer(after, "adapter_present")
    assert [v.name for v in after.graph.output] == ["adapter_present.0.0", "adapter_present.0.1"]
    assert [n.op_type for n in after.graph.node] == ["Add", "Neg"]
    plan = _output_plan([v.name for v in after.graph.output])
    np.testing.assert_array_equal(_stack_layers(_run(after, {"x": x}), plan[0][1]),
                                  _run(before, {"x": x})[0])
