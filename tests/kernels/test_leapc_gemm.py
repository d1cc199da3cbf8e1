"""leapc's GEMM ops run by ONNX Runtime, in both weight formats: ``Q8MatMul``
(kernels/native/q8_gemm.c) and ``BF16MatMul`` (bf16_gemm.c), each equal bit for bit to
its Python reference, a row's result independent of the rows beside it, and the layouts'
round trips."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from leapc.kernels import bf16_gemm, q8_gemm
from leapc.kernels.ort_ops import DOMAIN, WeightFormat, compile_library
from leapc.runtime.backends.onnx_fuse_matmul_neighbours import fold_into_leapc_matmuls
from leapc.runtime.backends.onnx_leapc_matmul import PACKINGS, use_leapc_matmuls
from leapc.runtime.backends.ort import session_options

pytestmark = pytest.mark.skipif(
    "avx512_vnni" not in open("/proc/cpuinfo").read(),
    reason="leapc's kernels need a CPU with AVX512-VNNI")


def _reference(weights: WeightFormat, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    if weights is WeightFormat.Q8:
        return q8_gemm.reference(x, *q8_gemm.pack_weights(weight))
    return bf16_gemm.reference(x, bf16_gemm.pack_weights(weight))


# how far from float32 each format may land, relative to the largest output
TOLERANCE = {WeightFormat.Q8: 0.02, WeightFormat.BF16: 0.005}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return compile_library(tmp_path_factory.mktemp("ops") / "ops.so")


def _matmul_model(weight: np.ndarray, rank: int = 2):
    """``y = x @ weight`` as a float ONNX model, ``x`` of the given rank."""
    n = weight.shape[1]
    dims = ["B", "M", "K"][-rank:]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:-1], n])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _session(model, library):
    options = session_options()  # the process's one ORT pool, as engines run
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("weights", WeightFormat)
@pytest.mark.parametrize("k, n", [(320, 448), (864, 320), (64, 48), (96, 2048)])
def test_matmul_equals_the_reference_bit_for_bit(library, weights, k, n):
    rng = np.random.default_rng(k + n)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    model = _matmul_model(weight)
    assert use_leapc_matmuls(model, weights) == 1
    assert [node.op_type for node in model.graph.node] == [weights.op]
    assert {i.name for i in model.graph.initializer} == \
        {"w" + suffix for suffix in PACKINGS[weights].suffixes}
    session = _session(model, library)
    for rows in (1, 2, 3, 5, 8, 9, 17, 32):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        np.testing.assert_array_equal(session.run(None, {"x": x})[0],
                                      _reference(weights, x, weight), err_msg=f"{rows} rows")
    # and close to float32
    x = rng.standard_normal((8, k)).astype(np.float32)
    exact = x @ weight
    assert np.abs(session.run(None, {"x": x})[0] - exact).max() < \
        TOLERANCE[weights] * np.abs(exact).max()


@pytest.mark.parametrize("weights", WeightFormat)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(library, weights):
    """The N-invariance a verify step needs: row i of an M-row call equals the same row
    alone, at every M and position (3-D inputs, as the step program's)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((320, 1728)).astype(np.float32)
    model = _matmul_model(weight, rank=3)
    use_leapc_matmuls(model, weights)
    session = _session(model, library)
    x = rng.standard_normal((1, 16, 320)).astype(np.float32) * 3
    alone = np.concatenate([session.run(None, {"x": x[:, i:i + 1]})[0] for i in range(16)], 1)
    for width in (2, 5, 8, 9, 16):
        for start in (0, 16 - width):
            wide = session.run(None, {"x": x[:, start:start + width]})[0]
            np.testing.assert_array_equal(wide, alone[:, start:start + width])


@pytest.mark.parametrize("weights", WeightFormat)
@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_biased_gemm_becomes_the_op_and_an_add(library, weights, trans_b):
    """``Gemm(x, W, b)`` (a biased linear on 2-D rows, as in the heads program) is the op's
    product of ``W`` (transposed first if ``transB``) plus ``b``; a scaling Gemm stays."""
    rng = np.random.default_rng(trans_b)
    weight = rng.standard_normal((320, 448)).astype(np.float32)
    bias = rng.standard_normal(448).astype(np.float32)
    stored = weight.T.copy() if trans_b else weight
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b),
         helper.make_node("Gemm", ["x", "w", "b"], ["z"], transB=trans_b, alpha=0.5)], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 320])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["M", 448]) for name in "yz"],
        [numpy_helper.from_array(stored, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert use_leapc_matmuls(model, weights) == 1
    fold_into_leapc_matmuls(model)  # the bias is no residual: its Add stays
    assert [node.op_type for node in model.graph.node] == [weights.op, "Add", "Gemm"]
    x = rng.standard_normal((5, 320)).astype(np.float32)
    y, z = _session(model, library).run(None, {"x": x})
    np.testing.assert_array_equal(y, _reference(weights, x, weight) + bias)
    np.testing.assert_allclose(z, 0.5 * x @ weight + bias, rtol=1e-4, atol=1e-4)


def test_a_weight_selected_from_a_stacked_constant_is_packed(library):
    """The heads program's ``Gather(Gather(stack, k), b)``: folded, then packed."""
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((3, 2, 64, 48)).astype(np.float32)
    index = [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in (1, 2)]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["stack", "i2"], ["head"], axis=0),
         helper.make_node("Gather", ["head", "i1"], ["block"], axis=0),
         helper.make_node("MatMul", ["x", "block"], ["y"])], "select",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 48])],
        [numpy_helper.from_array(stack, "stack"), *index])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert use_leapc_matmuls(model, WeightFormat.Q8) == 1
    assert [node.op_type for node in model.graph.node] == [WeightFormat.Q8.op]
    assert "stack" not in {i.name for i in model.graph.initializer}
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(_session(model, library).run(None, {"x": x})[0],
                                  _reference(WeightFormat.Q8, x, stack[2, 1]))


@pytest.mark.parametrize("weights, shape", [(WeightFormat.Q8, (40, 48)),  # K % 32 != 0
                                            (WeightFormat.BF16, (64, 40))])  # N % 16 != 0
def test_weights_the_kernel_cannot_block_stay_float(weights, shape):
    model = _matmul_model(np.ones(shape, np.float32))
    assert use_leapc_matmuls(model, weights) == 0
    assert [node.op_type for node in model.graph.node] == ["MatMul"]
    assert all(o.domain != DOMAIN for o in model.opset_import)


def test_q8_packing_round_trips():
    weight = np.random.default_rng(1).standard_normal((96, 64)).astype(np.float32)
    q, scales = q8_gemm.quantize_weights(weight)
    assert np.abs(q).max() == 127
    unpacked_q, unpacked_scales = q8_gemm.unpack_weights(*q8_gemm.pack_weights(weight))
    np.testing.assert_array_equal(unpacked_q, q)
    np.testing.assert_array_equal(unpacked_scales, scales)
    with pytest.raises(ValueError, match="K % 32 == 0 and N % 16 == 0, got 96 x 40"):
        q8_gemm.pack_weights(np.ones((96, 40), np.float32))


def test_bf16_packing_rounds_to_nearest_even_and_round_trips():
    one_ulp = 2.0 ** -7  # bfloat16 keeps 7 fraction bits
    values = np.asarray([1.0, 1 + one_ulp / 2, 1 + 3 * one_ulp / 2, 1 + 0.6 * one_ulp, -2.5],
                        np.float32)
    # a tie goes to the even neighbour: 1 + ulp/2 -> 1, 1 + 3 ulp/2 -> 1 + 2 ulp
    np.testing.assert_array_equal(bf16_gemm.from_bfloat16(bf16_gemm.to_bfloat16(values)),
                                  [1.0, 1.0, 1 + 2 * one_ulp, 1 + one_ulp, -2.5])
    weight = np.random.default_rng(2).standard_normal((40, 48)).astype(np.float32)
    rounded = bf16_gemm.from_bfloat16(bf16_gemm.to_bfloat16(weight))
    np.testing.assert_array_equal(bf16_gemm.unpack_weights(bf16_gemm.pack_weights(weight)),
                                  rounded)
    assert np.abs(rounded - weight).max() <= np.abs(weight).max() * 2.0 ** -8
    with pytest.raises(ValueError, match="N % 16 == 0, got 40 x 40"):
        bf16_gemm.pack_weights(np.ones((40, 40), np.float32))


@pytest.mark.parametrize("weights", WeightFormat)
def test_a_mismatched_weight_is_refused_with_its_shapes(library, weights):
    model = _matmul_model(np.ones((64, 32), np.float32))
    use_leapc_matmuls(model, weights)
    session = _session(model, library)
    with pytest.raises(Exception, match=r"x \[\.\.\., 96\] does not match packed weights"):
        session.run(None, {"x": np.ones((1, 96), np.float32)})


def _fused_session(library, op: str, weights: WeightFormat, weight: np.ndarray,
                   inputs: list[str], **attributes):
    """A one-node model of one of leapc's GEMM ops on ``weight``'s packed form, its packed
    inputs named ``w0``, ``w1``..."""
    packed = PACKINGS[weights].pack(weight)
    constants = [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(packed)]
    names = [f"w{i}" for i in range(len(packed))]
    inputs = [part for name in inputs for part in (names if name == "w" else [name])]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], domain=DOMAIN, **attributes)], op,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
         for name in inputs if name not in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(DOMAIN, 1)])
    return _session(model, library)


def _rms_norm(x, gamma, eps):
    return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * gamma


def _swiglu(gate_up):
    gate, up = np.split(gate_up.astype(np.float64), 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("weights", WeightFormat)
@pytest.mark.parametrize("prologue", ["RMSNorm", "SwiGLU"])
def test_prologues_are_the_product_of_the_rows_they_compute(library, weights, prologue):
    """The norm or SwiGLU before the product is the one the graph computed (within float
    rounding, which int8 activations can move by one quantization step), a residual is
    added exactly as the ``Add`` it replaces, and each row's result does not depend on
    the rows beside it."""
    rng = np.random.default_rng(7)
    k, n = 320, 128
    op = prologue + weights.op
    weight = rng.standard_normal((k, n)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, k).astype(np.float32)
    if prologue == "RMSNorm":
        inputs, attributes = ["x", "gamma", "w"], {"epsilon": 1e-5}
        x = rng.standard_normal((1, 12, k)).astype(np.float32) * 3
        rows, extra = _rms_norm(x, gamma, 1e-5).astype(np.float32), {"gamma": gamma}
    else:
        inputs, attributes = ["x", "w"], {}
        x = rng.standard_normal((1, 12, 2 * k)).astype(np.float32) * 3
        rows, extra = _swiglu(x).astype(np.float32), {}
    session = _fused_session(library, op, weights, weight, [*inputs, "r"], **attributes)
    residual = rng.standard_normal((1, 12, n)).astype(np.float32)
    y = session.run(None, {"x": x, "r": residual, **extra})[0]
    np.testing.assert_allclose(y - residual, _reference(weights, rows[0], weight)[None],
                               atol=0.05 * np.abs(y - residual).max())
    for width, start in ((1, 3), (5, 0), (8, 4), (9, 3)):
        part = session.run(None, {"x": x[:, start:start + width],
                                  "r": residual[:, start:start + width], **extra})[0]
        np.testing.assert_array_equal(part, y[:, start:start + width])
    without = _fused_session(library, op, weights, weight, inputs, **attributes)
    np.testing.assert_array_equal(y, without.run(None, {"x": x, **extra})[0] + residual)
