"""Fold the nodes around each of leapc's GEMM ops (``ai.leapc::Q8MatMul`` or
``BF16MatMul``) into it, in an ONNX model, in place: the RMSNorm in front of a projection
(``RMSNormQ8MatMul``), the SwiGLU in front of the down projection (``SwiGLUQ8MatMul``),
and the residual ``Add`` after a projection (the op's optional last input).

A decoder layer then is five nodes: the norm and q/k/v projection, the attention block
(`onnx_fuse_attention`), the output projection and its residual, the norm and gate/up
projection, the SwiGLU and down projection and its residual. Each folded node cost ONNX
Runtime a few microseconds of dispatch; the kernel applies it to a row while the row is
in cache (kernels/native/row_ops.c), in an order fixed by the row's length alone, so a
token's results stay independent of the rows beside it.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from leapc.kernels.ort_ops import DOMAIN, WeightFormat
from leapc.runtime.backends.onnx_graph import GraphIndex, attribute, drop_unread
from leapc.runtime.backends.onnx_leapc_matmul import PACKINGS


def _base_inputs(weights: WeightFormat) -> dict[str, int]:
    """A format's ops and their inputs before the optional residual."""
    packed = len(PACKINGS[weights].suffixes)  # the weights [and their scales]
    plain, norm, swiglu = weights.ops
    return {plain: 1 + packed, norm: 2 + packed, swiglu: 1 + packed}


# leapc's GEMM ops and their inputs before the optional residual
BASE_INPUTS = {op: n for weights in WeightFormat for op, n in _base_inputs(weights).items()}


def fold_into_leapc_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite ``model``; return how many nodes were folded away."""
    before = len(model.graph.node)
    _fold_prologues(model.graph)
    _fold_residuals(model.graph)
    drop_unread(model.graph)
    return before - len(model.graph.node)


def _fold_prologues(graph: onnx.GraphProto) -> None:
    g = GraphIndex(graph)
    formats = {weights.op: weights for weights in WeightFormat}
    for node in graph.node:
        weights = formats.get(node.op_type) if node.domain == DOMAIN else None
        if weights is None or len(node.input) != BASE_INPUTS[node.op_type]:
            continue
        _, norm_op, swiglu_op = weights.ops
        norm = _rms_norm(g, node.input[0])
        if norm is not None:
            x, gamma, epsilon = norm
            _become(node, norm_op, [x, gamma, *node.input[1:]], epsilon=epsilon)
            continue
        gate_up = _swiglu(g, node.input[0])
        if gate_up is not None:
            _become(node, swiglu_op, [gate_up, *node.input[1:]])


def _become(node: onnx.NodeProto, op_type: str, inputs: list[str], **attributes) -> None:
    node.op_type = op_type
    del node.input[:]
    node.input.extend(inputs)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attributes.items())


def _rms_norm(g: GraphIndex, name: str) -> tuple[str, str, float] | None:
    """``RMSNormalization(x, gamma)`` over the last axis, read by this node only:
    ``(x, gamma, epsilon)``."""
    norm = g.made_by(name, "RMSNormalization")
    if norm is None or not g.private(name) or attribute(norm, "axis", -1) != -1 \
            or attribute(norm, "stash_type", 1) != 1 or len(norm.input) != 2 \
            or len(g.constants.get(norm.input[1], onnx.TensorProto()).dims) != 1:
        return None
    return norm.input[0], norm.input[1], attribute(norm, "epsilon", 1e-5)


def _swiglu(g: GraphIndex, name: str) -> str | None:
    """``silu(gate) * up`` with ``gate, up = Split(gate_up)`` in equal halves, its values
    read by the pattern only: ``gate_up``."""
    product = g.made_by(name, "Mul")
    if product is None or not g.private(name):
        return None
    for silu, up in (tuple(product.input), tuple(reversed(product.input))):
        gate = _silu_input(g, silu)
        split = g.made_by(gate, "Split") if gate else None
        if split is not None and list(split.output) == [gate, up] and g.private(up) \
                and _equal_halves(g, split):
            return split.input[0]
    return None


def _silu_input(g: GraphIndex, name: str) -> str | None:
    """``x`` for ``name = x * Sigmoid(x)``, its values read by the pattern only."""
    mul = g.made_by(name, "Mul")
    if mul is None or not g.private(name):
        return None
    for x, gate in (tuple(mul.input), tuple(reversed(mul.input))):
        sigmoid = g.made_by(gate, "Sigmoid")
        if sigmoid is not None and sigmoid.input[0] == x and g.private(gate) \
                and len(g.readers[x]) == 2:
            return x
    return None


def _equal_halves(g: GraphIndex, split: onnx.NodeProto) -> bool:
    if attribute(split, "axis", 0) != -1:
        return False
    if len(split.input) > 1 and split.input[1] in g.constants:
        sizes = numpy_helper.to_array(g.constants[split.input[1]]).tolist()
    else:
        sizes = list(attribute(split, "split", []))
    return len(sizes) == 2 and sizes[0] == sizes[1]


def _fold_residuals(graph: onnx.GraphProto) -> None:
    """``Add(matmul(...), residual)`` -> the matmul with ``residual`` as its last input,
    in the Add's place (the residual is made before the Add, not always before the
    matmul). A constant addend is a bias broadcast over rows, not a residual of the
    product's shape, and stays an Add."""
    g = GraphIndex(graph)
    folded = {}  # id(Add) -> the matmul now in its place
    for add in graph.node:
        if add.op_type != "Add" or add.domain:
            continue
        for product, residual in (tuple(add.input), tuple(reversed(add.input))):
            matmul = g.producer.get(product)
            if matmul is not None and matmul.domain == DOMAIN and matmul.op_type in BASE_INPUTS \
                    and len(matmul.input) == BASE_INPUTS[matmul.op_type] and g.private(product) \
                    and residual not in g.constants:
                matmul.input.append(residual)
                matmul.output[0] = add.output[0]
                folded[id(add)] = matmul
                break
    moved = {id(matmul) for matmul in folded.values()}
    rewritten = [folded.get(id(node), node) for node in graph.node if id(node) not in moved]
    del graph.node[:]
    graph.node.extend(rewritten)
