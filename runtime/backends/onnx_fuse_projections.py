"""Fuse the projections that read the same activations into one ``MatMul`` and a ``Split``.

A decoder layer projects its normed input three times (queries, keys, values) and its
post-attention input twice (gate, up). On a small model every ONNX Runtime node costs a
few microseconds of dispatch and thread-pool wake-up whatever its arithmetic, and one
``[H, Nq + Nk + Nv]`` product costs less than three narrow ones. Columns are independent
in a matrix product, so each output column is the product it was; only MLAS's blocking
over K, which it sizes from the column count, can round a float32 column differently (a
row's result never depends on how many rows share the step, the invariant the decode loop
needs). Run before weight-only quantization, which quantizes each column's blocks on their
own: the fused int8 weight holds exactly the separate weights' values and scales, and
MatMulNBits computes each column as it did (bit for bit, tested). Float32 programs are
not fused: there an early exit's draft and the full step must compute the same KV rows
bit for bit, and with fused projections the tiny Llama's early exit left `ar`'s tokens.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from leapc.runtime.backends.onnx_graph import drop_unread


def fuse_sibling_projections(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place; return how many groups were fused. A group is every
    ``MatMul`` of one input by a constant 2-D weight held in the model (weights in external
    data are left as they are, unread). Groups of the same weights (an unrolled draft
    chain's calls) share one fused weight."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer
               if len(init.dims) == 2 and init.data_location != onnx.TensorProto.EXTERNAL}
    groups = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul" and not node.domain and node.input[1] in weights:
            groups[node.input[0]].append(node)
    joined: dict[tuple[str, ...], tuple[str, str]] = {}
    fused = {}
    for nodes in (nodes for nodes in groups.values() if len(nodes) > 1):
        key = tuple(n.input[1] for n in nodes)
        if key not in joined:
            joined[key] = _join(graph, nodes, weights)
        fused[id(nodes[0])] = _split_product(nodes, *joined[key])
    siblings = {id(n) for nodes in groups.values() if len(nodes) > 1 for n in nodes}
    rewritten = []
    for node in graph.node:
        rewritten.extend(fused.get(id(node), [node] if id(node) not in siblings else []))
    del graph.node[:]
    graph.node.extend(rewritten)
    drop_unread(graph)  # the separate weights
    return len(fused)


def _join(graph: onnx.GraphProto, nodes: list, weights: dict) -> tuple[str, str]:
    """The nodes' weights side by side, and their column counts, as new initializers."""
    arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
    name = nodes[0].name or nodes[0].output[0]
    joined, sizes = f"{name}.fused_weight", f"{name}.fused_split"
    graph.initializer.extend([
        numpy_helper.from_array(np.concatenate(arrays, axis=1), joined),
        numpy_helper.from_array(np.array([a.shape[1] for a in arrays], np.int64), sizes)])
    return joined, sizes


def _split_product(nodes: list, joined: str, sizes: str) -> list:
    """One ``MatMul`` by the joined weights, split back into the nodes' outputs."""
    name = nodes[0].name or nodes[0].output[0]
    product = f"{name}.fused"
    return [onnx.helper.make_node("MatMul", [nodes[0].input[0], joined], [product],
                                  name=f"{name}/fused"),
            onnx.helper.make_node("Split", [product, sizes], [n.output[0] for n in nodes],
                                  name=f"{name}/split", axis=-1)]
