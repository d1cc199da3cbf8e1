"""Fuse each layer's attention block, from its fused q/k/v projection to the input of its
output projection, into one ``ai.leapc::RotaryTreeAttention`` node, in an ONNX model, in
place.

After `fuse_sibling_projections` and the ``TreeAttention`` lowering, a decoder layer's
attention is a dozen nodes: the projection's ``Split``, a ``Reshape`` and a ``Transpose``
per q/k/v, ``RotaryEmbedding`` on q and k, ``TreeAttention``, then a ``Reshape``,
``Transpose`` and ``Reshape`` back to ``[B, N, H * Dv]``. Each costs ONNX Runtime a few
microseconds of dispatch whatever its size, which on a small model is more than their
arithmetic. The fused node computes the same values in one call
(kernels/native/ort_ops.c): it writes the rotated keys and the values as the step's
``present`` outputs, as the replaced nodes did, and its attention is `TreeAttention`'s,
row for row.

A block that does not have exactly this shape (interleaved RoPE, a projection read
elsewhere, keys consumed by other nodes) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from leapc.kernels.ort_ops import DOMAIN
from leapc.runtime.backends.onnx_graph import GraphIndex, attribute, drop_unread

_HEADS_TO_TOKENS = [0, 2, 1, 3]  # [B, N, H, D] <-> [B, H, N, D]


@dataclass(frozen=True)
class _Block:
    """One matched attention block: the nodes it replaces and the fused node's operands."""

    attention: onnx.NodeProto
    nodes: tuple[onnx.NodeProto, ...]  # the others
    qkv: str
    cos: str
    sin: str
    out: str
    heads: int


def _head_view(g: GraphIndex, name: str) -> tuple[list[onnx.NodeProto], str] | None:
    """``Transpose(Reshape(x), [0, 2, 1, 3])``: its two nodes and ``x``."""
    transpose = g.made_by(name, "Transpose")
    if transpose is None or list(attribute(transpose, "perm", [])) != _HEADS_TO_TOKENS:
        return None
    reshape = g.made_by(transpose.input[0], "Reshape")
    if reshape is None or not g.private(transpose.input[0]):
        return None
    return [reshape, transpose], reshape.input[0]


def _rotated_view(g: GraphIndex, name: str):
    """``RotaryEmbedding(head_view(x), cos, sin)`` (rotate-half form): its nodes, ``x``,
    ``cos`` and ``sin``."""
    rotary = g.made_by(name, "RotaryEmbedding")
    if rotary is None or len(rotary.input) != 3 or attribute(rotary, "interleaved", 0):
        return None
    view = _head_view(g, rotary.input[0])
    if view is None or not g.private(rotary.input[0]):
        return None
    return [*view[0], rotary], view[1], rotary.input[1], rotary.input[2]


def _same_angles(g: GraphIndex, a: str, b: str) -> bool:
    """Whether two cos (or sin) tensors are one, or the same op of the same input."""
    if a == b:
        return True
    pa, pb = g.producer.get(a), g.producer.get(b)
    return (pa is not None and pb is not None and pa.op_type == pb.op_type in ("Cos", "Sin")
            and list(pa.input) == list(pb.input))


def _tokens_major(g: GraphIndex, name: str) -> tuple[list[onnx.NodeProto], str] | None:
    """The attention output's way back to ``[B, N, H * Dv]``: an optional same-shape
    ``Reshape``, ``Transpose([0, 2, 1, 3])``, ``Reshape``. Its nodes and final value."""
    nodes = []
    if not g.private(name):
        return None
    node = g.readers[name][0]
    if node.op_type == "Reshape":
        nodes.append(node)
        if not g.private(node.output[0]):
            return None
        node = g.readers[node.output[0]][0]
    if node.op_type != "Transpose" or list(attribute(node, "perm", [])) != _HEADS_TO_TOKENS \
            or not g.private(node.output[0]):
        return None
    reshape = g.readers[node.output[0]][0]
    if reshape.op_type != "Reshape":
        return None
    return [*nodes, node, reshape], reshape.output[0]


def _split_sizes(g: GraphIndex, split: onnx.NodeProto) -> list[int] | None:
    if len(split.input) > 1 and split.input[1] in g.constants:
        return numpy_helper.to_array(g.constants[split.input[1]]).tolist()
    return list(attribute(split, "split", [])) or None


def _match(g: GraphIndex, attention: onnx.NodeProto) -> _Block | None:
    q, k_past, k_new, v_past, v_new = attention.input[:5]
    query, key = _rotated_view(g, q), _rotated_view(g, k_new)
    value = _head_view(g, v_new)
    back = _tokens_major(g, attention.output[0])
    if None in (query, key, value, back) or not g.private(q):
        return None
    at = g.position[id(attention)]
    if any(g.position[id(reader)] < at for x in (k_new, v_new) for reader in g.readers[x]):
        return None  # the fused node makes them in the attention's place: nothing reads earlier
    split = g.producer.get(query[1])
    parts = (query[1], key[1], value[1])
    if split is None or split.op_type != "Split" or list(split.output) != list(parts) \
            or attribute(split, "axis", 0) not in (-1, 2) or not all(map(g.private, parts)):
        return None
    if not (_same_angles(g, query[2], key[2]) and _same_angles(g, query[3], key[3])):
        return None
    sizes, (kv_heads, head_dim) = _split_sizes(g, split), g.dims.get(k_past, [0, 0, 0, 0])[1::2]
    if not sizes or not head_dim or sizes[0] % head_dim or sizes[1] != kv_heads * head_dim:
        return None
    nodes = (split, *query[0], *key[0], *value[0], *back[0])
    return _Block(attention, nodes, split.input[0], query[2], query[3], back[1],
                  sizes[0] // head_dim)


def fuse_rotary_attention(model: onnx.ModelProto) -> int:
    """Rewrite every matching block; return how many were fused."""
    graph = model.graph
    g = GraphIndex(graph)
    blocks = [block for node in graph.node if node.op_type == "TreeAttention"
              and node.domain == DOMAIN and (block := _match(g, node)) is not None]
    fused = {id(block.attention): _fused_node(block) for block in blocks}
    removed = {id(n) for block in blocks for n in block.nodes}
    rewritten = [fused.get(id(node), node) for node in graph.node if id(node) not in removed]
    del graph.node[:]  # the fused node takes the attention's place in the order
    graph.node.extend(rewritten)
    drop_unread(graph)
    return len(fused)


def _fused_node(block: _Block) -> onnx.NodeProto:
    q, k_past, k_new, v_past, v_new, past_len, tree_mask = block.attention.input
    # The optional attributes, where present (absent: none), as the kernel node had them.
    optional = {name: value for name in ("softcap", "window")
                if (value := attribute(block.attention, name))}
    return helper.make_node(
        "RotaryTreeAttention",
        [block.qkv, block.cos, block.sin, k_past, v_past, past_len, tree_mask],
        [block.out, k_new, v_new], name=f"{block.attention.name}/rotary", domain=DOMAIN,
        scale=attribute(block.attention, "scale"), num_heads=block.heads, **optional)
