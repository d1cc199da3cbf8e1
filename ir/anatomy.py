"""Recover a captured model's structure from graph metadata (DESIGN §3).

Passes never hard-code a family: they ask the anatomy for landmarks. Everything here is
derived from each node's ``nn_module_stack`` (which module's code produced it) and op
targets, so the same code serves Llama, Qwen, Gemma, Phi-3, GPT-2, ...
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.fx import Graph, Node

from leapc.ir.errors import UnsupportedModelError

_ATTENTION_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)
_PROJECTION_OPS = (torch.ops.aten.linear.default, torch.ops.aten.matmul.default,
                   torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
_VIEW_OPS = (torch.ops.aten.alias.default, torch.ops.aten.slice.Tensor,
             torch.ops.aten.view.default, torch.ops.aten.reshape.default)
_INDEXED = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)$")


@dataclass(frozen=True)
class LayerAnatomy:
    index: int
    module: str  # e.g. "model.layers.3"
    residual_in: str  # node names
    residual_out: str
    attention: tuple[str, ...]
    keys: str  # the node holding past + new keys (the cache update)
    values: str


@dataclass(frozen=True)
class Anatomy:
    embedding: str
    layers: tuple[LayerAnatomy, ...]
    final_norm: str  # the node the LM head reads
    lm_head: str
    lm_head_weight: str  # parameter name (the embedding's for tied weights)

    def describe(self) -> list[tuple[str, str]]:
        first, last = self.layers[0], self.layers[-1]
        return [
            ("embedding", self.embedding),
            ("decoder layers", f"{len(self.layers)} × {first.module.rsplit('.', 1)[0]}.<i>"),
            ("layer 0 residual in/out", f"{first.residual_in} → {first.residual_out}"),
            (f"layer {last.index} residual in/out", f"{last.residual_in} → {last.residual_out}"),
            ("attention op", ", ".join(first.attention)),
            ("KV (layer 0)", f"{first.keys}, {first.values}"),
            ("final norm output", self.final_norm),
            ("LM head", f"{self.lm_head} (weight {self.lm_head_weight})"),
        ]


def module_path(node: Node) -> str:
    """Innermost module that produced ``node``, without the capture wrapper's ``model.``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("model.") if path != "model" else ""


def _in_module(node: Node, module: str) -> bool:
    path = module_path(node)
    return path == module or path.startswith(module + ".")


def _is_hidden(node: Node, hidden: int) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.ndim == 3 and val.shape[-1] == hidden


def _decoder_layers(graph: Graph, num_layers: int) -> list[str]:
    """The ModuleList whose children number exactly ``num_layers`` and hold attention ops."""
    indices: dict[str, set[int]] = defaultdict(set)
    for node in graph.nodes:
        if node.target not in _ATTENTION_OPS:
            continue
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            match = _INDEXED.match(path.removeprefix("model."))
            if match:
                indices[match["prefix"]].add(int(match["index"]))
    for prefix, found in indices.items():
        if found == set(range(num_layers)):
            return [f"{prefix}.{i}" for i in range(num_layers)]
    raise UnsupportedModelError(
        f"anatomy: no module list of {num_layers} decoder layers with attention ops found"
    )


def _layer(graph: Graph, index: int, module: str, hidden: int) -> LayerAnatomy:
    nodes = [n for n in graph.nodes if n.op == "call_function" and _in_module(n, module)]
    inside = set(nodes)
    external_hidden = [a for n in nodes for a in n.all_input_nodes
                       if a not in inside and _is_hidden(a, hidden)]
    escaping = [n for n in nodes if _is_hidden(n, hidden)
                and any(u not in inside for u in n.users)]
    attention = [n for n in nodes if n.target in _ATTENTION_OPS]
    # The cache update concatenates the past (computed outside the layer) with new rows.
    cache = [n for n in nodes if n.target == torch.ops.aten.cat.default
             and any(a not in inside for a in n.all_input_nodes)]
    missing = [what for what, found in (("an input residual stream", external_hidden),
                                         ("an output residual stream", escaping),
                                         ("an attention op", attention),
                                         ("a key and a value cache update", len(cache) == 2))
               if not found]
    if missing:
        raise UnsupportedModelError(f"anatomy: layer {module} lacks {', '.join(missing)}")
    keys, values = _kv_of(attention[0], cache)
    return LayerAnatomy(index, module, external_hidden[0].name, escaping[-1].name,
                        tuple(n.name for n in attention), keys.name, values.name)


def _kv_of(attention: Node, cache: list[Node]) -> tuple[Node, Node]:
    """Which cache update feeds the attention's keys (arg 1) and which its values (arg 2).

    Walks back from each argument through the single-tensor reshapes between them
    (``repeat_kv``'s expand/reshape, dtype casts); falls back to program order.
    """
    found = []
    for arg in attention.args[1:3]:
        node = arg
        while isinstance(node, Node) and node not in cache and node.all_input_nodes:
            node = node.all_input_nodes[0]
        found.append(node if node in cache else None)
    if found[0] is not None and found[1] is not None and found[0] is not found[1]:
        return found[0], found[1]
    return cache[0], cache[1]


def _lm_head(program: ExportedProgram) -> tuple[Node, str]:
    """Walk back from the ``logits`` output to the vocabulary projection."""
    out = program.graph.output_node()
    node = out.args[0][0]
    params = program.graph_signature.inputs_to_parameters
    seen = []
    while node.op == "call_function":
        seen.append(node)
        if node.target in _PROJECTION_OPS:
            weight = next((a for a in node.all_input_nodes if a.name in params), None)
            if weight is not None:
                return node, params[weight.name]
        node = node.all_input_nodes[0]
    raise UnsupportedModelError("anatomy: no LM head projection found behind the logits output")


def _reads_tokens(node: Node) -> bool:
    """``node`` is the ``tokens`` input, possibly behind views (GPT-2 reshapes it first)."""
    while node.op == "call_function" and node.target in _VIEW_OPS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node.op == "placeholder" and node.name == "tokens"


def recover_anatomy(program: ExportedProgram, num_layers: int, hidden: int) -> Anatomy:
    graph = program.graph
    embeddings = [n for n in graph.nodes if n.target == torch.ops.aten.embedding.default
                  and _reads_tokens(n.args[1])]
    if not embeddings:
        raise UnsupportedModelError("anatomy: no token embedding reads the tokens input")
    layers = tuple(_layer(graph, i, m, hidden)
                   for i, m in enumerate(_decoder_layers(graph, num_layers)))
    head, weight = _lm_head(program)
    norm = head.all_input_nodes[0]
    while norm.target in _VIEW_OPS:  # logits_to_keep slicing sits between norm and head
        norm = norm.all_input_nodes[0]
    return Anatomy(
        embedding=embeddings[0].name,
        layers=layers,
        final_norm=norm.name,
        lm_head=head.name,
        lm_head_weight=weight,
    )
