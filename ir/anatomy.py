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
from torch.export.graph_signature import OutputKind
from torch.fx import Graph, Node

from leapc.ir.capture import CapturedProgram
from leapc.ir.errors import UnsupportedModelError
from leapc.ir.graph import descendants

# By qualified name: leapc's own op is declared in leapc.kernels, which ir does not import.
ATTENTION_OPS = ("aten::scaled_dot_product_attention", "leapc::capped_attention",
                 "leapc::tree_attention")
_VIEW_OPS = (torch.ops.aten.alias.default, torch.ops.aten.slice.Tensor,
             torch.ops.aten.view.default, torch.ops.aten.reshape.default,
             torch.ops.aten.select.int)
_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)
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
    # residual_in + the attention branch: what the MLP branch reads and adds to (None where
    # a family runs attention and MLP in parallel from residual_in)
    residual_mid: str | None = None


@dataclass(frozen=True)
class Anatomy:
    embedding: str
    layers: tuple[LayerAnatomy, ...]
    final_norm: str  # the node the LM head reads
    lm_head: str
    lm_head_weight: str  # parameter name (the embedding's for tied weights)
    lm_head_bias: str | None = None  # parameter name, for the few heads with a bias

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
            ("LM head", f"{self.lm_head} (weight {self.lm_head_weight}"
                        + (f", bias {self.lm_head_bias})" if self.lm_head_bias else ")")),
        ]


def is_attention(node: Node) -> bool:
    """An attention op: dense SDPA or soft-capped attention (as captured), or tree
    attention (after that pass)."""
    return isinstance(node.target, torch._ops.OpOverload) and node.target.name() in ATTENTION_OPS


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
        if not is_attention(node):
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
    attention = [n for n in nodes if is_attention(n)]
    kv = _cache_updates(attention[0], inside) if attention else None
    missing = [what for what, found in (("an input residual stream", external_hidden),
                                         ("an output residual stream", escaping),
                                         ("an attention op", attention),
                                         ("a key and a value cache update", kv))
               if not found]
    if missing:
        raise UnsupportedModelError(f"anatomy: layer {module} lacks {', '.join(missing)}")
    keys, values = kv
    mid = _residual_mid(external_hidden[0], escaping[-1], attention[0])
    return LayerAnatomy(index, module, external_hidden[0].name, escaping[-1].name,
                        tuple(n.name for n in attention), keys.name, values.name,
                        mid.name if mid is not None else None)


def _residual_mid(residual_in: Node, residual_out: Node, attention: Node) -> Node | None:
    """The add of ``residual_in`` and the attention branch, if ``residual_out`` adds the MLP
    branch to it (identity casts and views may sit between them)."""
    if residual_out.target != torch.ops.aten.add.Tensor:
        return None
    after_attention = descendants(attention)
    for arg in residual_out.args[:2]:
        mid = _unaliased(arg)
        if (mid.target == torch.ops.aten.add.Tensor and mid in after_attention
                and residual_in in map(_unaliased, mid.args[:2])):
            return mid
    return None


def _unaliased(node) -> Node:
    """``node`` behind views and same-dtype casts (the same values)."""
    while (isinstance(node, Node) and node.op == "call_function" and node.all_input_nodes
           and (node.target in _VIEW_OPS or node.target in _CASTS)
           and _same_shape(node, node.all_input_nodes[0])):
        node = node.all_input_nodes[0]
    return node


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
            and va.shape == vb.shape and va.dtype == vb.dtype)


def _cache_updates(attention: Node, inside: set[Node]) -> tuple[Node, Node] | None:
    """The concatenations of past and new keys / values feeding ``attention`` (args 1, 2).

    Walks back from each argument along first inputs (``repeat_kv``'s expand/reshape,
    casts) to a ``cat`` that joins rows from the ``past`` input (or, after a pass that
    changes how the cache arrives, rows computed outside the layer) with new ones.
    """
    found = []
    for arg in attention.args[1:3]:
        node = arg
        while isinstance(node, Node) and not _is_cache_update(node, inside):
            node = node.all_input_nodes[0] if node.all_input_nodes else None
        found.append(node)
    keys, values = found
    if keys is None or values is None or keys is values:
        return None
    return keys, values


def _is_cache_update(node: Node, inside: set[Node]) -> bool:
    if node.target != torch.ops.aten.cat.default:
        return False
    return any(_from_input(a, "past") or a not in inside for a in node.all_input_nodes)


def _from_input(node: Node, name: str) -> bool:
    """``node`` is the placeholder ``name``, possibly behind views and selections."""
    while node.op == "call_function" and node.target in _VIEW_OPS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node.op == "placeholder" and node.name == name


# For each projection op: (index of the activation arg, index of the weight, of the bias).
_PROJECTION_ARGS = {
    torch.ops.aten.linear.default: (0, 1, 2),
    torch.ops.aten.matmul.default: (0, 1, None),
    torch.ops.aten.mm.default: (0, 1, None),
    torch.ops.aten.addmm.default: (1, 2, 0),
}
_WEIGHT_VIEWS = (*_VIEW_OPS, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
                 torch.ops.aten.permute.default, torch.ops.aten._to_copy.default,
                 torch.ops.aten.to.dtype)


def _parameter(node, params: dict[str, str]) -> str | None:
    """The parameter ``node`` reads, possibly behind transposes, views and casts."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in _WEIGHT_VIEWS:
        node = node.args[0]
    if isinstance(node, Node) and node.op == "placeholder":
        return params.get(node.name)
    return None


def _logits_node(program: ExportedProgram) -> Node:
    """The first user output (buffer mutations, if any, precede user outputs)."""
    users = [s for s in program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    name = users[0].arg.name
    return next(n for n in program.graph.output_node().all_input_nodes if n.name == name)


def _lm_head(program: ExportedProgram) -> tuple[Node, Node, str, str | None]:
    """Walk back from the ``logits`` output to the vocabulary projection.

    Returns the projection node, its activation input, its weight's and (if any) its bias's
    parameter names.
    """
    node = _logits_node(program)
    params = program.graph_signature.inputs_to_parameters
    while node.op == "call_function":
        if node.target in _PROJECTION_ARGS:
            x, w, b = _PROJECTION_ARGS[node.target]
            weight = _parameter(node.args[w], params) if len(node.args) > w else None
            if weight is not None:
                bias = _parameter(node.args[b], params) if b is not None and len(node.args) > b \
                    else None
                return node, node.args[x], weight, bias
        if not node.all_input_nodes:
            break
        node = node.all_input_nodes[0]
    raise UnsupportedModelError("anatomy: no LM head projection found behind the logits output")


def recover_anatomy(program: ExportedProgram, num_layers: int, hidden: int) -> Anatomy:
    graph = program.graph
    embeddings = [n for n in graph.nodes if n.target == torch.ops.aten.embedding.default
                  and _from_input(n.args[1], "tokens")]
    if not embeddings:
        raise UnsupportedModelError("anatomy: no token embedding reads the tokens input")
    layers = tuple(_layer(graph, i, m, hidden)
                   for i, m in enumerate(_decoder_layers(graph, num_layers)))
    head, norm, weight, bias = _lm_head(program)
    # logits_to_keep slicing (and GPT-2's 2-D reshape) sit between the norm and the head
    while norm.op == "call_function" and norm.target in _VIEW_OPS:
        norm = norm.all_input_nodes[0]
    if not _is_hidden(norm, hidden):
        raise UnsupportedModelError(
            f"anatomy: the LM head reads {norm.name}, not a [B, N, {hidden}] hidden state"
        )
    return Anatomy(
        embedding=embeddings[0].name,
        layers=layers,
        final_norm=norm.name,
        lm_head=head.name,
        lm_head_weight=weight,
        lm_head_bias=bias,
    )


def anatomy_of(program: CapturedProgram) -> Anatomy:
    """`recover_anatomy` of a captured program, at its own layer count and hidden size."""
    return recover_anatomy(program.program, program.dims.num_layers, program.dims.hidden_size)
