"""Rewire every layer's attention to ``leapc.tree_attention`` (DESIGN §4).

Captured layers call dense SDPA with an additive mask built from the step's ``mask``
input, behind ``repeat_kv`` (keys and values copied once per query head of their group).
This pass computes the compact mask once at the graph head (``past_len [B]`` valid cache
slots per row, ``tree_mask [B, N, N]`` the new tokens' ancestor matrix) and replaces each
SDPA by the tree-attention op on the un-repeated keys and values. The step contract is
unchanged; the program relies on what the runtime's masks always satisfy: a prefix of
valid cache slots, the same for every new token (`leapc.kernels.tree_attention`).

A sliding-window layer's SDPA (its mask narrowed by `ir.capture`'s window) either stays
dense or becomes tree attention carrying the window (`Windows`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from leapc.ir.anatomy import module_path
from leapc.ir.capture import CapturedProgram
from leapc.ir.errors import UnsupportedModelError
from leapc.ir.graph import MaskForm, sdpa_mask_form, sliding_window, step_mask_form
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


class Windows(enum.Enum):
    """What the pass makes of a sliding-window layer's attention."""

    # SDPA under its narrowed mask, as captured: exact, but a dense layer's rows are not
    # width-invariant (the ONNX-op and AOTInductor lowerings, which do not promise that)
    DENSE = "dense"
    # leapc.tree_attention with the window as its ``window`` argument (the last W keys of
    # each row's visible list): width-invariant wherever tree attention is
    TREE = "tree"


def _tree_attention_args(gm: GraphModule, sdpa: Node, mask: Node) -> tuple:
    """Queries, un-repeated keys and values, the scale, the soft cap (0: none) and the
    sliding window (0: none) of one SDPA or `leapc.capped_attention` call."""
    args = sdpa.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
    layer = module_path(sdpa) or sdpa.name
    if args.get("dropout_p") or args.get("is_causal"):
        raise UnsupportedModelError(f"tree attention: {layer} uses dropout or is_causal attention")
    form = None if args["attn_mask"] is None else step_mask_form(args["attn_mask"], mask)
    if form is None:
        raise UnsupportedModelError(
            f"tree attention: {layer}'s attention mask is not the step mask input")
    window = 0 if form is MaskForm.STEP else sliding_window(args["attn_mask"], mask)
    if window is None:
        raise UnsupportedModelError(
            f"tree attention: {layer}'s attention mask narrows the step mask by something "
            "other than a sliding window")
    query = args["query"]
    scale = args["scale"] or 1 / math.sqrt(query.meta["val"].shape[-1])
    return (query, _unrepeated(args["key"]), _unrepeated(args["value"]), scale,
            args.get("softcap", 0.0), window)


def _optional(softcap: float, window: int) -> tuple:
    """The op's trailing arguments, only as far as they are used: programs without a cap
    or a window keep its six-argument form (their graphs and engines are unchanged)."""
    if window:
        return softcap, window
    return (softcap,) if softcap else ()


def _insert(gm: GraphModule, windows: Windows) -> bool:
    calls = [n for n in gm.graph.nodes if n.target in (SDPA, CAPPED)]
    if not calls:
        raise PassError("insert_tree_attention: no attention op to rewrite")
    mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "mask")
    if windows is Windows.DENSE:
        calls = [n for n in calls if sdpa_mask_form(n, mask) is not MaskForm.NARROWED]
    if not calls:
        return False  # every layer is windowed and kept dense: the program stays as captured
    with gm.graph.inserting_after(mask):
        tree_mask = gm.graph.call_function(tree_part, (mask,))
        past_len = gm.graph.call_function(past_lengths, (mask,))
    for sdpa in calls:
        q, k, v, scale, softcap, window = _tree_attention_args(gm, sdpa, mask)
        with gm.graph.inserting_before(sdpa):
            tree = gm.graph.call_function(
                TREE_ATTENTION, (q, k, v, past_len, tree_mask, scale, *_optional(softcap, window)))
        tree.meta = dict(sdpa.meta)  # nn_module_stack: the op stays inside its layer
        sdpa.replace_all_uses_with(tree)
        gm.graph.erase_node(sdpa)
    return True


@dataclass(frozen=True)
class InsertTreeAttention:
    windows: Windows = Windows.DENSE
    name: ClassVar[str] = "insert_tree_attention"
    requires: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY}
    )
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY, Invariant.TREE_ATTENTION}
    )

    def __call__(self, program: CapturedProgram) -> PassResult:
        return PassResult(*rewrite(program, lambda gm: _insert(gm, self.windows)))
