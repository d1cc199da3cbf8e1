"""Pass the KV cache to and from an ONNX step program one layer's keys or values at a time.

The step contract's ``past`` is one tensor ``[L, 2, B, Hkv, T, Dh]``. Exported as is,
every layer selects its keys and values with two ``Gather`` nodes, and ONNX Runtime
materialises each selection: two copies of the whole cache every step before the
``Concat`` with the new rows makes the third. The runtime's cache is one contiguous
buffer whose ``[l, kv]`` slices are contiguous too, so the program can take them as
inputs ``past.<l>.<kv>`` (``[B, Hkv, T, Dh]``), in place of ``past`` and in its position
among the inputs, and the runtime passes views: no copy but the ``Concat``.

The new rows come back the same way: the exporter builds ``present`` ``[L, 2, B, Hkv, N,
Dh]`` by stacking each layer's rows, a dozen ``Unsqueeze`` / ``Concat`` nodes per layer
pair that ONNX Runtime runs every step; the program returns each layer's rows as
``present.<l>.<kv>`` instead, and `OrtStep` stacks them (one copy of N rows).

Kangaroo's adapter cache (``adapter_past`` / ``adapter_present``, one layer) is passed the
same way. `OrtStep` feeds an input named ``<name>.<l>.<kv>`` from signature input
``<name>``, and gathers outputs named so into signature output ``<name>``.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import numpy_helper

from leapc.ir.errors import GraphError

PAST, PRESENT = "past", "present"
_INDEX_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def layer_input(layer: int, kv: int, cache: str = PAST) -> str:
    return f"{cache}.{layer}.{kv}"


def layer_output(layer: int, kv: int, cache: str = PRESENT) -> str:
    return f"{cache}.{layer}.{kv}"


def split_past_by_layer(model: onnx.ModelProto, cache: str = PAST) -> None:
    """Rewrite ``model`` in place; a program without input ``cache`` is left as it is."""
    graph = model.graph
    position = next((i for i, v in enumerate(graph.input) if v.name == cache), None)
    if position is None:
        return
    past = graph.input[position]
    users = _users(graph)
    scalars = {init.name: int(numpy_helper.to_array(init)) for init in graph.initializer
               if not init.dims and init.data_type in _INDEX_TYPES
               and init.data_location != onnx.TensorProto.EXTERNAL}
    renames, dropped, used = {}, set(), set()
    for node in users[cache]:
        if node.op_type == "Shape":
            continue  # T, rewritten below
        layer = _selection(node, scalars, cache)
        dropped.add(id(node))
        for inner in users[node.output[0]]:
            kv = _selection(inner, scalars, cache)
            renames[inner.output[0]] = layer_input(layer, kv, cache)
            used.add((layer, kv))
            dropped.add(id(inner))
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        node.input[:] = [renames.get(name, name) for name in node.input]
        if node.op_type == "Shape" and node.input[0] == cache:
            _read_length_from(node, layer_input(*min(used), cache), cache)
    del graph.node[:]
    graph.node.extend(kept)
    graph.input.remove(past)
    read = {name for node in kept for name in node.input} | {v.name for v in graph.output}
    unread = [i for i in graph.initializer if i.name in scalars and i.name not in read]
    for init in unread:  # indices only the removed selections read
        graph.initializer.remove(init)
    for offset, (layer, kv) in enumerate(sorted(used)):
        graph.input.insert(position + offset,
                           _layer_value_info(past, layer_input(layer, kv, cache)))


def _users(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _selection(node: onnx.NodeProto, scalars: dict[str, int], cache: str) -> int:
    """The constant index a ``Gather`` on axis 0 selects; anything else is unexpected."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if node.op_type != "Gather" or axis != 0 or node.input[1] not in scalars:
        raise GraphError(f"split_past_by_layer: {cache} is read by {node.op_type} "
                         f"{node.name!r}, not by a constant Gather on axis 0")
    return scalars[node.input[1]]


def _read_length_from(node: onnx.NodeProto, name: str, cache: str) -> None:
    """``Shape(past)[4:5]`` (T) as ``Shape(past.l.kv)[2:3]``."""
    bounds = {a.name: a.i for a in node.attribute}
    if (bounds.get("start"), bounds.get("end")) != (4, 5):
        raise GraphError(f"split_past_by_layer: {node.name!r} reads {cache}'s shape "
                         f"{bounds}, not its length T alone")
    node.input[0] = name
    del node.attribute[:]
    node.attribute.extend([onnx.helper.make_attribute("start", 2),
                           onnx.helper.make_attribute("end", 3)])


def _layer_value_info(whole: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """``[B, Hkv, T | N, Dh]``: ``whole``'s type without its two leading axes."""
    value = onnx.ValueInfoProto()
    value.CopyFrom(whole)
    value.name = name
    dims = value.type.tensor_type.shape.dim
    del dims[:2]
    return value


def split_present_by_layer(model: onnx.ModelProto, cache: str = PRESENT) -> None:
    """Rewrite ``model`` in place so each layer's new keys and values are outputs of their
    own, in output ``cache``'s position. One that is not a stack of per-layer stacks (an
    unrolled chain concatenates its calls' rows) is left whole."""
    graph = model.graph
    position = next((i for i, v in enumerate(graph.output) if v.name == cache), None)
    if position is None:
        return
    producers = {out: node for node in graph.node for out in node.output}
    constants = {init.name: numpy_helper.to_array(init).tolist() for init in graph.initializer
                 if init.data_location != onnx.TensorProto.EXTERNAL and len(init.dims) <= 1}
    layers, stacking = _stacked(producers, constants, cache)
    rows = []
    for stack in layers:
        pair, nodes = _stacked(producers, constants, stack)
        rows.append(pair)
        stacking += nodes
    if not layers or any(len(pair) != 2 for pair in rows):
        return
    dropped = {id(n) for n in stacking}
    kept = [n for n in graph.node if id(n) not in dropped]
    internal = {out for n in stacking for out in n.output} - {cache}
    if any(name in internal for n in kept for name in n.input):
        return  # another node reads a partial stack
    renames, outputs = {}, {v.name for v in graph.output}
    for layer, pair in enumerate(rows):
        for kv, row in enumerate(pair):
            name = layer_output(layer, kv, cache)
            if row in renames or row in outputs or row not in producers:
                kept.append(onnx.helper.make_node("Identity", [row], [name]))
            else:
                renames[row] = name
    for node in kept:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    del graph.node[:]
    graph.node.extend(kept)
    whole = graph.output[position]
    graph.output.remove(whole)
    for offset, (layer, kv) in enumerate((i, kv) for i in range(len(rows)) for kv in range(2)):
        graph.output.insert(position + offset,
                            _layer_value_info(whole, layer_output(layer, kv, cache)))


def _stacked(producers: dict, constants: dict, name: str) -> tuple[list[str], list]:
    """What ``name`` stacks on axis 0 (a ``Concat`` of ``Unsqueeze``s at axis 0, or for a
    stack of one, the ``Unsqueeze`` alone) and the nodes that stack it; nothing if it is
    made another way."""
    concat = producers.get(name)
    if _unsqueezed_at_0(concat, constants):
        return [concat.input[0]], [concat]
    if concat is None or concat.op_type != "Concat" or \
            next(a.i for a in concat.attribute if a.name == "axis") != 0:
        return [], []
    parts = [producers.get(part) for part in concat.input]
    if not all(_unsqueezed_at_0(p, constants) for p in parts):
        return [], []
    return [p.input[0] for p in parts], [concat, *parts]


def _unsqueezed_at_0(node: onnx.NodeProto | None, constants: dict) -> bool:
    return node is not None and node.op_type == "Unsqueeze" and constants.get(node.input[1]) == [0]
