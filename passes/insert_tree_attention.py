"""Rewire every layer's attention to ``leapc.tree_attention`` (DESIGN §4).

Captured layers call dense SDPA with an additive mask built from the step's ``mask``
input, behind ``repeat_kv`` (keys and values copied once per query head of their group).
This pass computes the compact mask once at the graph head (``past_len [B]`` valid cache
slots per row, ``tree_mask [B, N, N]`` the new tokens' ancestor matrix) and replaces each
SDPA by the tree-attention op on the un-repeated keys and values. The step contract is
unchanged; the program relies on what the runtime's masks always satisfy: a prefix of
valid cache slots, the same for every new token (`leapc.kernels.tree_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from leapc.ir.anatomy import module_path
from leapc.ir.capture import CapturedProgram
from leapc.ir.errors import UnsupportedModelError
from leapc.ir.graph import MaskForm, sdpa_mask_form, step_mask_form
from leapc.ir.rewrite import rewrite
from leapc.kernels.tree_attention import past_lengths, tree_part
from leapc.passes.base import Invariant, PassError, PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CAPPED = torch.ops.leapc.capped_attention.default
TREE_ATTENTION = torch.ops.leapc.tree_attention.default
def _unrepeated(node: Node) -> Node:
    """The ``[B, Hkv, S, D]`` tensor behind transformers' ``repeat_kv``, else ``node`` itself.

    ``repeat_kv`` is ``x[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv * G, S, D)``:
    query head h reads KV head h // G, the grouping tree attention computes without the
    copy. Any other form is kept as is (one KV head per query head, still exact).
    """
    expand = node.args[0] if node.target in (aten.reshape.default, aten.view.default) else None
    if expand is None or expand.target != aten.expand.default:
        return node
    unsqueeze = expand.args[0]
    if unsqueeze.target != aten.unsqueeze.default or unsqueeze.args[1] != 2:
        return node
    return unsqueeze.args[0]


def _tree_attention_args(gm: GraphModule, sdpa: Node, mask: Node) -> tuple:
    """Queries, un-repeated keys and values, the scale and the soft cap (0: none) of one
    SDPA or `leapc.capped_attention` call."""
    args = sdpa.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
    layer = module_path(sdpa) or sdpa.name
    if args.get("dropout_p") or args.get("is_causal"):
        raise UnsupportedModelError(f"tree attention: {layer} uses dropout or is_causal attention")
    if args["attn_mask"] is None or step_mask_form(args["attn_mask"], mask) is not MaskForm.STEP:
        raise UnsupportedModelError(
            f"tree attention: {layer}'s attention mask is not the step mask input")
    query = args["query"]
    scale = args["scale"] or 1 / math.sqrt(query.meta["val"].shape[-1])
    return (query, _unrepeated(args["key"]), _unrepeated(args["value"]), scale,
            args.get("softcap", 0.0))


def _insert(gm: GraphModule, dense_windows: bool) -> bool:
    calls = [n for n in gm.graph.nodes if n.target in (SDPA, CAPPED)]
    if not calls:
        raise PassError("insert_tree_attention: no attention op to rewrite")
    mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "mask")
    windowed = [n for n in calls if sdpa_mask_form(n, mask) is MaskForm.NARROWED]
    if windowed and not dense_windows:
        raise UnsupportedModelError(
            f"sliding-window attention ({module_path(windowed[0]) or windowed[0].name}) "
            "is not supported with width-invariant attention (build with --attention tree)")
    calls = [n for n in calls if n not in windowed]
    if not calls:
        return False  # every layer is windowed: the program stays as captured
    with gm.graph.inserting_after(mask):
        tree_mask = gm.graph.call_function(tree_part, (mask,))
        past_len = gm.graph.call_function(past_lengths, (mask,))
    for sdpa in calls:
        q, k, v, scale, softcap = _tree_attention_args(gm, sdpa, mask)
        # The cap is an argument only where there is one: other programs keep the op's
        # six-argument form.
        capped = (softcap,) if softcap else ()
        with gm.graph.inserting_before(sdpa):
            tree = gm.graph.call_function(TREE_ATTENTION,
                                          (q, k, v, past_len, tree_mask, scale, *capped))
        tree.meta = dict(sdpa.meta)  # nn_module_stack: the op stays inside its layer
        sdpa.replace_all_uses_with(tree)
        gm.graph.erase_node(sdpa)
    return True


@dataclass(frozen=True)
class InsertTreeAttention:
    # Keep sliding-window layers dense (exact); False refuses them (a width-invariant lowering).
    dense_windows: bool = True
    name: ClassVar[str] = "insert_tree_attention"
    requires: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY}
    )
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY, Invariant.TREE_ATTENTION}
    )

    def __call__(self, program: CapturedProgram) -> PassResult:
        return PassResult(*rewrite(program, lambda gm: _insert(gm, self.dense_windows)))
