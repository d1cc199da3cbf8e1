"""`fuse_rotary_attention`: one decoder attention block, as the exporter writes it after
the q/k/v fusion (Before), becomes one ``RotaryTreeAttention`` node (Expected) computing
the same outputs; a block whose keys are read before the attention is left alone."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from leapc.kernels.ort_ops import DOMAIN, compile_library
from leapc.runtime.backends.onnx_fuse_attention import fuse_rotary_attention
from leapc.runtime.backends.ort import session_options

pytestmark = pytest.mark.skipif(
    "avx512_vnni" not in open("/proc/cpuinfo").read(),
    reason="leapc's ORT ops need a CPU with AVX512-VNNI")

HEADS, KV_HEADS, DIM = 4, 2, 16
F = TensorProto.FLOAT


def _block(read_keys_first: bool = False, optional: dict | None = None):
    """Before: split -> per q/k/v Reshape + Transpose -> RoPE on q and k -> TreeAttention
    (with the ``optional`` attributes: a soft cap, a window) -> Reshape + Transpose + Reshape; the keys are also stacked
    by an ``Unsqueeze`` (after the attention, or before it)."""
    sizes = [HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM]
    heads_shape = numpy_helper.from_array(np.array([0, 0, -1, DIM], np.int64), "heads_shape")
    flat = numpy_helper.from_array(np.array([0, 0, HEADS * DIM], np.int64), "flat")
    split = numpy_helper.from_array(np.array(sizes, np.int64), "sizes")
    nodes = [helper.make_node("Split", ["qkv", "sizes"], ["q0", "k0", "v0"], axis=-1)]
    for x, out in (("q", "q2"), ("k", "k2"), ("v", "v_new")):
        nodes += [helper.make_node("Reshape", [f"{x}0", "heads_shape"], [f"{x}1"]),
                  helper.make_node("Transpose", [f"{x}1"], [out], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Cos", ["angles"], ["cos"]),
              helper.make_node("Sin", ["angles"], ["sin"]),
              helper.make_node("RotaryEmbedding", ["q2", "cos", "sin"], ["q3"], num_heads=HEADS),
              helper.make_node("RotaryEmbedding", ["k2", "cos", "sin"], ["k_new"],
                               num_heads=KV_HEADS)]
    stack = helper.make_node("Unsqueeze", ["k_new", "axis0"], ["stacked"])
    attention = [helper.make_node("TreeAttention", ["q3", "k_past", "k_new", "v_past", "v_new",
                                                    "past_len", "tree_mask"], ["a0"],
                                  domain=DOMAIN, scale=0.25,
                                  **(optional or {})),
                 helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
                 helper.make_node("Reshape", ["a1", "flat"], ["out"])]
    nodes += [stack, *attention] if read_keys_first else [*attention, stack]
    inputs = [helper.make_tensor_value_info("qkv", F, ["B", "N", sum(sizes)]),
              helper.make_tensor_value_info("angles", F, ["B", "N", DIM // 2]),
              helper.make_tensor_value_info("k_past", F, ["B", KV_HEADS, "T", DIM]),
              helper.make_tensor_value_info("v_past", F, ["B", KV_HEADS, "T", DIM]),
              helper.make_tensor_value_info("past_len", TensorProto.INT64, ["B"]),
              helper.make_tensor_value_info("tree_mask", TensorProto.BOOL, ["B", "N", "N"])]
    outputs = [helper.make_tensor_value_info(name, F, None)
               for name in ("out", "k_new", "v_new", "stacked")]
    constants = [heads_shape, flat, split,
                 numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    graph = helper.make_graph(nodes, "block", inputs, outputs, constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                   helper.make_opsetid(DOMAIN, 1)])


def _run(model, library, feeds):
    options = session_options()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("optional", ({}, {"softcap": 2.0}, {"window": 4},
                                      {"softcap": 2.0, "window": 7}))
def test_a_block_becomes_one_node_computing_the_same_outputs(tmp_path, optional):
    """The kernel node's optional attributes pass to the fused node (absent stays absent;
    a window of 4 and 7 hides keys of these 11-slot caches and 5-token chains)."""
    before = _block(optional=optional)
    expected_ops = ["Cos", "Sin", "RotaryTreeAttention", "Unsqueeze"]
    after = _block(optional=optional)
    assert fuse_rotary_attention(after) == 1
    assert [n.op_type for n in after.graph.node] == expected_ops
    fused = after.graph.node[2]
    assert list(fused.input) == ["qkv", "cos", "sin", "k_past", "v_past", "past_len",
                                 "tree_mask"]
    assert list(fused.output) == ["out", "k_new", "v_new"]
    assert {a.name: helper.get_attribute_value(a) for a in fused.attribute} == \
        {"scale": 0.25, "num_heads": HEADS, **optional}
    assert {i.name for i in after.graph.initializer} == {"axis0"}  # the shapes went unread

    rng = np.random.default_rng(0)
    batch, new, past = 2, 5, 11
    mask = np.tril(np.ones((batch, new, new), bool))
    feeds = {"qkv": rng.standard_normal((batch, new, (HEADS + 2 * KV_HEADS) * DIM), np.float32),
             "angles": rng.uniform(0, 30, (batch, new, DIM // 2)).astype(np.float32),
             "k_past": rng.standard_normal((batch, KV_HEADS, past, DIM), np.float32),
             "v_past": rng.standard_normal((batch, KV_HEADS, past, DIM), np.float32),
             "past_len": np.array([past, 3]), "tree_mask": mask}
    library = compile_library(tmp_path / "ops.so")
    for ours, theirs in zip(_run(after, library, feeds), _run(before, library, feeds),
                            strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_keys_read_before_the_attention_keep_the_block_as_it_is():
    model = _block(read_keys_first=True)
    ops = [n.op_type for n in model.graph.node]
    assert fuse_rotary_attention(model) == 0
    assert [n.op_type for n in model.graph.node] == ops
