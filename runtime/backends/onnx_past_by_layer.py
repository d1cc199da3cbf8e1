"""Feed the KV cache to an ONNX step program one layer's keys or values at a time.

The step contract's ``past`` is one tensor ``[L, 2, B, Hkv, T, Dh]``. Exported as is,
every layer selects its keys and values with two ``Gather`` nodes, and ONNX Runtime
materialises each selection: two copies of the whole cache every step before the
``Concat`` with the new rows makes the third. The runtime's cache is one contiguous
buffer whose ``[l, kv]`` slices are contiguous too, so the program can take them as
inputs ``past.<l>.<kv>`` (``[B, Hkv, T, Dh]``), in place of ``past`` and in its position
among the inputs, and the runtime passes views: no copy but the ``Concat``.

`OrtStep` feeds an input named ``<name>.<l>.<kv>`` from signature input ``<name>``.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import numpy_helper

from leapc.ir.errors import GraphError

PAST = "past"
_INDEX_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def layer_input(layer: int, kv: int) -> str:
    return f"{PAST}.{layer}.{kv}"


def split_past_by_layer(model: onnx.ModelProto) -> None:
    """Rewrite ``model`` in place; a program without ``past`` is left as it is."""
    graph = model.graph
    position = next((i for i, v in enumerate(graph.input) if v.name == PAST), None)
    if position is None:
        return
    past = graph.input[position]
    users = _users(graph)
    scalars = {init.name: int(numpy_helper.to_array(init)) for init in graph.initializer
               if not init.dims and init.data_type in _INDEX_TYPES
               and init.data_location != onnx.TensorProto.EXTERNAL}
    renames, dropped, used = {}, set(), set()
    for node in users[PAST]:
        if node.op_type == "Shape":
            continue  # T, rewritten below
        layer = _selection(node, scalars)
        dropped.add(id(node))
        for inner in users[node.output[0]]:
            kv = _selection(inner, scalars)
            renames[inner.output[0]] = layer_input(layer, kv)
            used.add((layer, kv))
            dropped.add(id(inner))
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        node.input[:] = [renames.get(name, name) for name in node.input]
        if node.op_type == "Shape" and node.input[0] == PAST:
            _read_length_from(node, layer_input(*min(used)))
    del graph.node[:]
    graph.node.extend(kept)
    graph.input.remove(past)
    read = {name for node in kept for name in node.input} | {v.name for v in graph.output}
    unread = [i for i in graph.initializer if i.name in scalars and i.name not in read]
    for init in unread:  # indices only the removed selections read
        graph.initializer.remove(init)
    for offset, (layer, kv) in enumerate(sorted(used)):
        graph.input.insert(position + offset, _layer_value_info(past, layer_input(layer, kv)))


def _users(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _selection(node: onnx.NodeProto, scalars: dict[str, int]) -> int:
    """The constant index a ``Gather`` on axis 0 selects; anything else is unexpected."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if node.op_type != "Gather" or axis != 0 or node.input[1] not in scalars:
        raise GraphError(f"split_past_by_layer: {PAST} is read by {node.op_type} "
                         f"{node.name!r}, not by a constant Gather on axis 0")
    return scalars[node.input[1]]


def _read_length_from(node: onnx.NodeProto, name: str) -> None:
    """``Shape(past)[4:5]`` (T) as ``Shape(past.l.kv)[2:3]``."""
    bounds = {a.name: a.i for a in node.attribute}
    if (bounds.get("start"), bounds.get("end")) != (4, 5):
        raise GraphError(f"split_past_by_layer: {node.name!r} reads {PAST}'s shape "
                         f"{bounds}, not its length T alone")
    node.input[0] = name
    del node.attribute[:]
    node.attribute.extend([onnx.helper.make_attribute("start", 2),
                           onnx.helper.make_attribute("end", 3)])


def _layer_value_info(past: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """``[B, Hkv, T, Dh]``: ``past``'s type without its two leading axes."""
    value = onnx.ValueInfoProto()
    value.CopyFrom(past)
    value.name = name
    dims = value.type.tensor_type.shape.dim
    del dims[:2]
    return value
