"""Replace MatMuls by constant weights with leapc's ``Q8MatMul`` (int8 weights and
activations, `leapc.kernels.q8_gemm`), in an ONNX model, in place.

Each ``MatMul(x, W)`` whose ``W`` is a 2-D initializer the kernel's blocking fits becomes
``ai.leapc.Q8MatMul(x, W.q8, W.q8_scales)``: the weight packed once here, at build time,
in the layout the kernel reads. A weight shared by several MatMuls is packed once. Other
MatMuls (attention's, a weight of odd shape) are left as they are.
"""

from __future__ import annotations

from leapc.kernels import q8_gemm
from leapc.kernels.ort_ops import DOMAIN


def use_q8_matmul(model) -> int:
    """Rewrite every eligible MatMul; return how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    packed: dict[str, tuple[str, str]] = {}
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and not node.domain else None
        if weight is None or len(weight.dims) != 2 or not q8_gemm.supports(*weight.dims):
            continue
        if weight.name not in packed:
            tiles, scales = q8_gemm.pack_weights(numpy_helper.to_array(weight))
            names = (f"{weight.name}.q8", f"{weight.name}.q8_scales")
            graph.initializer.extend([numpy_helper.from_array(tiles, names[0]),
                                      numpy_helper.from_array(scales, names[1])])
            packed[weight.name] = names
        node.op_type, node.domain = "Q8MatMul", DOMAIN
        node.input[1:] = list(packed[weight.name])
    still_read = {name for node in graph.node for name in node.input}
    unread = [i for i in graph.initializer if i.name in packed and i.name not in still_read]
    for initializer in unread:
        graph.initializer.remove(initializer)
    if packed and all(o.domain != DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return sum(node.op_type == "Q8MatMul" for node in graph.node)
