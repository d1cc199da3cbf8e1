"""Lookups and clean-up shared by leapc's ONNX graph rewrites (`onnx_fuse_*`)."""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper, numpy_helper


class GraphIndex:
    """Who makes and who reads each value of a graph, for matching patterns in it. Built
    once per rewrite: it does not follow later edits."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = list(graph.node)  # held: the ids below stay the nodes'
        self.position = {id(node): i for i, node in enumerate(self.nodes)}
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.readers[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.constants = {i.name: i for i in graph.initializer}
        self.dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                     for v in graph.input}

    def made_by(self, name: str, op_type: str, domain: str = "") -> onnx.NodeProto | None:
        """The node of that type that makes ``name``, or None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type \
            and node.domain == domain else None

    def private(self, name: str) -> bool:
        """Read by one node only, and not a graph output: safe to fuse away."""
        return len(self.readers[name]) == 1 and name not in self.outputs


def attribute(node: onnx.NodeProto, name: str, default=None):
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def drop_unread(graph: onnx.GraphProto) -> None:
    """Remove the nodes none of whose outputs is read (what a fusion left behind), then the
    constants no node reads."""
    while True:
        read = {name for node in graph.node for name in node.input} | \
            {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(out in read for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for constant in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(constant)


def transpose_constant_weights(graph: onnx.GraphProto) -> None:
    """Give every ``MatMul(x, Transpose(W))`` of a 2-D initializer ``W`` the constant ``W.T``
    instead, one per ``W`` whatever its readers: the exporter leaves the ``Transpose`` of a
    ``linear`` whose weight is read twice (a tied vocabulary projection, or every call of
    an unrolled draft chain), and packed-weight kernels take constant operands only."""
    constants = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    transposed: dict[str, str] = {}
    for node in graph.node:
        transpose = producers.get(node.input[1]) if node.op_type == "MatMul" \
            and not node.domain else None
        if transpose is None or transpose.op_type != "Transpose" \
                or transpose.input[0] not in constants \
                or len(constants[transpose.input[0]].dims) != 2 \
                or list(attribute(transpose, "perm", [1, 0])) != [1, 0]:
            continue
        table = constants[transpose.input[0]]
        if table.name not in transposed:
            transposed[table.name] = f"{table.name}.transposed"
            graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(table).T.copy(), transposed[table.name]))
        node.input[1] = transposed[table.name]
    drop_unread(graph)
