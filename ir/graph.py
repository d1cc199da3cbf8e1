"""FX graph queries and edits shared by passes, their invariant checks and `ir.early_exit`.

They live in ir/ because more than one pass needs each of them, and the invariants of
`passes/base.py` must judge a graph by the same definitions the passes rewrite it with
(`is_noop`, `constant_placeholders`): a helper owned by one pass module would make the
others, and the pass contract itself, import that pass.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node

from leapc.ir.errors import GraphError

aten = torch.ops.aten
_IDENTITIES = (aten.alias.default, aten.detach.default, aten.detach_.default,
               aten.lift_fresh_copy.default)
_CASTS = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default)


def nodes_by_name(gm: GraphModule) -> dict[str, Node]:
    """The graph's nodes by name: the anatomy records its landmarks by node name, and
    names survive unlifting."""
    return {n.name: n for n in gm.graph.nodes}


def _reachable(node: Node, neighbours: Callable[[Node], Iterable[Node]]) -> set[Node]:
    seen, todo = set(), [node]
    while todo:
        for other in neighbours(todo.pop()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def descendants(node: Node) -> set[Node]:
    """Every node that reads ``node``, directly or not."""
    return _reachable(node, lambda n: n.users)


def ancestors(node: Node) -> set[Node]:
    """Every node ``node`` reads, directly or not."""
    return _reachable(node, lambda n: n.all_input_nodes)


def constant_placeholders(program: ExportedProgram) -> set[Node]:
    """Placeholders bound to parameters, buffers or lifted constants (not user inputs)."""
    user = set(program.graph_signature.user_inputs)
    return {n for n in program.graph.nodes if n.op == "placeholder" and n.name not in user}


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def is_empty_1d(node) -> bool:
    """An empty 1-D tensor: what a `DynamicCache` layer starts from before its first cat."""
    val = _val(node)
    return val is not None and val.ndim == 1 and val.shape[0] == 0


def _is_identity_cast(node: Node) -> bool:
    src, out = _val(node.args[0]), _val(node)
    return (src is not None and out is not None and src.dtype == out.dtype
            and src.device == out.device)


def is_noop(node: Node) -> bool:
    """An op that returns its input unchanged: an alias or detach, a cast to the dtype and
    device it already has, or a concatenation with an empty operand."""
    if node.op != "call_function":
        return False
    if node.target in _IDENTITIES:
        return True
    if node.target in _CASTS:
        return _is_identity_cast(node)
    if node.target == aten.cat.default:
        return any(is_empty_1d(t) for t in node.args[0])
    return False


def layer_presents(gm: GraphModule, num_layers: int) -> list[Node]:
    """Each layer's ``[2, B, Hkv, N, Dh]`` rows, from the ``stack`` the capture returns as
    ``present``: a pass that drops or replaces layers re-stacks these (`stack_presents`)."""
    present = gm.graph.output_node().args[0][1]
    if present.target != aten.stack.default or len(present.args[0]) != num_layers \
            or present.kwargs.get("dim", 0) != 0 or len(present.args) > 1:
        raise GraphError(f"the present output is not a stack of {num_layers} layers "
                         f"({present.format_node()})")
    return list(present.args[0])


def stack_presents(gm: GraphModule, rows: list[Node]) -> Node:
    """A new ``present`` stacking ``rows`` (layer first), before the output node."""
    with gm.graph.inserting_before(gm.graph.output_node()):
        return gm.graph.call_function(aten.stack.default, (rows,))


def prune(gm: GraphModule) -> None:
    """Drop what no output needs, weights included (export would keep every parameter of
    the module as a program input, so a draft would carry the whole model).

    FX keeps an unused SDPA (dropout makes it "random") and export's metadata asserts
    as side effects; the graph is functional, and re-export inserts the asserts again
    for what is left.
    """
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    weights = [*gm.named_parameters(remove_duplicate=False),
               *gm.named_buffers(remove_duplicate=False)]
    for name, _ in weights:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)


# An additive mask value this negative gives weight exactly 0 after the softmax in every
# float dtype (exp underflows), so the dense mask hides a key exactly as -inf does.
HIDDEN = float(torch.finfo(torch.float16).min)
_MASK_CASTS = (aten.to.dtype, aten._to_copy.default, aten.alias.default)
_ANDS = (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default)


class MaskForm(enum.Enum):
    """How an attention op's mask derives from the step's ``mask`` input."""

    STEP = "the step mask"  # ``where(mask, 0, finfo.min)[:, None]``, casts aside
    NARROWED = "the step mask and another condition"  # ``where(mask & window, ...)``


def step_mask_form(node: Node, mask: Node) -> MaskForm | None:
    """Whether ``node`` is the step mask as SDPA takes it (boolean or additive), narrowed
    (a sliding window, `ir.capture`), or neither (None).

    The capture builds ``where(mask, 0, finfo.min)[:, None]``; only that form is known to
    hide exactly the keys the compact tree mask hides.
    """
    unsqueezed, form = False, MaskForm.STEP
    while node is not mask:
        if node.target in _MASK_CASTS:
            node = node.args[0]
        elif node.target == aten.unsqueeze.default and node.args[1] == 1 and not unsqueezed:
            node, unsqueezed = node.args[0], True
        elif node.target == aten.where.Scalar and node.args[1] == 0 and node.args[2] <= HIDDEN:
            node = node.args[0]
        elif node.target in _ANDS and mask in node.args and form is MaskForm.STEP:
            node, form = mask, MaskForm.NARROWED
        else:
            return None
    return form if unsqueezed else None


def sdpa_mask_form(sdpa: Node, mask: Node) -> MaskForm | None:
    """`step_mask_form` of an SDPA node's ``attn_mask`` argument (None without one)."""
    attn_mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    return step_mask_form(attn_mask, mask) if isinstance(attn_mask, Node) else None


def _is_placeholder(node, name: str) -> bool:
    return isinstance(node, Node) and node.op == "placeholder" and node.name == name


def sliding_window(attn_mask: Node, mask: Node) -> int | None:
    """The window W of a `MaskForm.NARROWED` mask whose other condition is `ir.capture`'s
    sliding window, ``positions[:, :, None] - cat([arange(T), positions])[:, None] < W``
    (`_within_window`); None if it is anything else.
    """
    node = attn_mask
    while node.target not in _ANDS:  # the casts, unsqueeze and where step_mask_form read
        node = node.args[0]
    (term,) = [a for a in node.args if a is not mask]
    if term.target != aten.lt.Scalar or not isinstance(term.args[1], int):
        return None
    sub = term.args[0]
    if sub.target != aten.sub.Tensor:
        return None
    query, keys = sub.args
    if query.target != aten.unsqueeze.default or query.args[1] != 2 \
            or not _is_placeholder(query.args[0], "positions"):
        return None
    if keys.target != aten.unsqueeze.default or keys.args[1] != 1:
        return None
    cat = keys.args[0]
    if cat.target != aten.cat.default or cat.args[1] != 1 or len(cat.args[0]) != 2:
        return None
    past, new = cat.args[0]
    slots = past.args[0] if past.target == aten.expand.default else past
    if not _is_placeholder(new, "positions") or slots.target != aten.arange.default \
            or len(slots.args) != 1:
        return None
    return term.args[1]
