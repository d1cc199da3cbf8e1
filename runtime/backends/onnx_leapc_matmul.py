"""Replace MatMuls by constant weights with one of leapc's GEMM ops, in an ONNX model, in
place: ``Q8MatMul`` (int8 weights and activations, `leapc.kernels.q8_gemm`) or
``BF16MatMul`` (bfloat16 weights, float32 arithmetic, `leapc.kernels.bf16_gemm`).

Each ``MatMul(x, W)`` whose ``W`` is a 2-D initializer the kernel's blocking fits becomes
``ai.leapc.<format>MatMul(x, *packed(W))``: the weight packed once here, at build time,
in the layout the kernel reads. A weight shared by several MatMuls is packed once. Other
MatMuls (attention's, a weight of odd shape) are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from leapc.kernels import bf16_gemm, q8_gemm
from leapc.kernels.ort_ops import DOMAIN, WeightFormat


@dataclass(frozen=True)
class _Packing:
    supports: Callable[[int, int], bool]
    pack: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    suffixes: tuple[str, ...]  # of the packed initializers' names, in the op's input order


PACKINGS = {
    WeightFormat.Q8: _Packing(q8_gemm.supports, q8_gemm.pack_weights, (".q8", ".q8_scales")),
    WeightFormat.BF16: _Packing(bf16_gemm.supports, lambda w: (bf16_gemm.pack_weights(w),),
                                (".bf16",)),
}


def use_leapc_matmuls(model, weights: WeightFormat) -> int:
    """Rewrite every eligible MatMul; return how many were rewritten."""
    from onnx import helper, numpy_helper

    packing = PACKINGS[weights]
    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    packed: dict[str, list[str]] = {}
    for node in graph.node:
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" and not node.domain \
            else None
        if weight is None or len(weight.dims) != 2 or not packing.supports(*weight.dims):
            continue
        if weight.name not in packed:
            arrays = packing.pack(numpy_helper.to_array(weight))
            names = [weight.name + suffix for suffix in packing.suffixes]
            graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names,
                                                                                  strict=True))
            packed[weight.name] = names
        node.op_type, node.domain = weights.op, DOMAIN
        node.input[1:] = packed[weight.name]
    still_read = {name for node in graph.node for name in node.input}
    unread = [i for i in graph.initializer if i.name in packed and i.name not in still_read]
    for initializer in unread:
        graph.initializer.remove(initializer)
    if packed and all(o.domain != DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return sum(node.op_type == weights.op for node in graph.node)
