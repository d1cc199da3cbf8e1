"""Replace MatMuls by constant weights with one of leapc's GEMM ops, in an ONNX model, in
place: ``Q8MatMul`` (int8 weights and activations, `leapc.kernels.q8_gemm`) or
``BF16MatMul`` (bfloat16 weights, float32 arithmetic, `leapc.kernels.bf16_gemm`).

Each ``MatMul(x, W)`` whose ``W`` is a 2-D initializer the kernel's blocking fits becomes
``ai.leapc.<format>MatMul(x, *packed(W))``: the weight packed once here, at build time,
in the layout the kernel reads. A weight shared by several MatMuls is packed once. Other
MatMuls (attention's, a weight of odd shape) are left as they are.

A ``Gemm(x, W, b)`` of 2-D rows (what the exporter makes of a biased linear on a matrix,
as in the heads program) is the same product plus ``b``: it becomes the op, then an
``Add``. A Gemm that scales (``alpha``/``beta`` other than 1) or transposes ``x`` stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from leapc.kernels import bf16_gemm, q8_gemm
from leapc.kernels.ort_ops import DOMAIN, WeightFormat
from leapc.runtime.backends.onnx_graph import attribute, drop_unread


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
    """Rewrite every eligible MatMul and Gemm; return how many leapc ops there are."""
    from onnx import helper, numpy_helper

    packing = PACKINGS[weights]
    graph = model.graph
    _fold_constant_selections(graph)
    constants = {i.name: i for i in graph.initializer}
    packed: dict[str, list[str]] = {}
    nodes = []
    for node in graph.node:
        key, weight = _constant_weight(node, constants)
        if weight is None or not packing.supports(*weight.shape):
            nodes.append(node)
            continue
        if key not in packed:
            arrays = packing.pack(weight)
            names = [key + suffix for suffix in packing.suffixes]
            graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names,
                                                                                  strict=True))
            packed[key] = names
        nodes += _leapc_matmul(node, packed[key], weights)
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {name for node in graph.node for name in node.input}
    replaced = {name.removesuffix("/T") for name in packed}
    unread = [i for i in graph.initializer if i.name in replaced and i.name not in still_read]
    for initializer in unread:
        graph.initializer.remove(initializer)
    if packed and all(o.domain != DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return sum(node.op_type == weights.op for node in graph.node)


def _fold_constant_selections(graph) -> None:
    """Make each ``Gather(W, i)`` of an initializer at a constant index an initializer of its
    own: the heads program selects head k's block b from one stacked weight, and only a
    constant weight can be packed. (ONNX Runtime folds them too, but only when the session
    starts, after packing.)"""
    from onnx import numpy_helper

    constants = {i.name: i for i in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type != "Gather" or node.domain or attribute(node, "axis", 0) != 0 \
                or not all(name in constants for name in node.input) \
                or constants[node.input[1]].dims:
            kept.append(node)
            continue
        table = numpy_helper.to_array(constants[node.input[0]])
        index = int(numpy_helper.to_array(constants[node.input[1]]))
        selected = numpy_helper.from_array(table[index].copy(), node.output[0])
        graph.initializer.append(selected)
        constants[node.output[0]] = selected
    del graph.node[:]
    graph.node.extend(kept)
    drop_unread(graph)  # the stacked weights the selections read


def _constant_weight(node, constants) -> tuple[str, np.ndarray | None]:
    """A name for ``W`` as ``[K, N]`` (the initializer's, with ``/T`` if transposed) and
    ``W`` itself, if ``node`` is ``MatMul(x, W)`` or a plain ``Gemm(x, W[, b])`` with ``W`` a
    2-D initializer; else no weight."""
    from onnx import numpy_helper

    name = node.input[1] if len(node.input) > 1 else ""
    if node.domain or node.op_type not in ("MatMul", "Gemm") or name not in constants \
            or len(constants[name].dims) != 2:
        return name, None
    array = numpy_helper.to_array(constants[name])
    if node.op_type == "MatMul":
        return name, array
    if attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0 \
            or attribute(node, "transA", 0):
        return name, None
    return (f"{name}/T", array.T.copy()) if attribute(node, "transB", 0) else (name, array)


def _leapc_matmul(node, packed: list[str], weights: WeightFormat) -> list:
    """The leapc op in ``node``'s place (and a Gemm's bias as an ``Add`` after it)."""
    from onnx import helper

    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    output = node.output[0]
    product = f"{output}.product" if bias else output
    matmul = helper.make_node(weights.op, [node.input[0], *packed], [product],
                              name=node.name, domain=DOMAIN)
    return [matmul, helper.make_node("Add", [product, bias], [output],
                                     name=f"{node.name}.bias")] if bias else [matmul]
