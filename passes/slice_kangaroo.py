"""Cut Kangaroo's draft out of a step program: layers < E, the adapter, the head (DESIGN §4).

``(tokens, positions, past [E, ...], adapter_past [1, ...], mask) -> (logits, present
[E, ...], hidden, adapter_present [1, ...])``: ``present`` and ``hidden`` as
`slice_draft`'s, ``logits`` the model's own head (`ir.early_exit.slice_head`) over the
trained adapter's output (`ir/adapter.py`), ``adapter_present`` the adapter's KV rows.

The adapter is a module, not graph nodes, so the layers, the adapter and the head are
composed as modules and the composition is exported anew. Its attention is the program's
kind: where the layers' attention is already `leapc.tree_attention`
(`insert_tree_attention`), the adapter's is too, so a lowering fuses it as it fuses theirs
(on ONNX Runtime, into one ``RotaryTreeAttention`` node instead of some sixty plain ops).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule

from leapc.ir.adapter import Attend, KangarooAdapter, dense_attention
from leapc.ir.anatomy import anatomy_of
from leapc.ir.capture import (
    ADAPTER_PAST,
    ADAPTER_PRESENT,
    HIDDEN_INPUT,
    CapturedProgram,
    export_step,
)
from leapc.ir.early_exit import check_exit_layer, exit_hidden, slice_head, slice_signature
from leapc.ir.graph import layer_presents, prune, stack_presents
from leapc.ir.rewrite import capture_options, set_outputs, unlift
from leapc.kernels.tree_attention import past_lengths, tree_attention, tree_part
from leapc.passes.base import Invariant, PassResult
from leapc.passes.insert_tree_attention import TREE_ATTENTION


def _tree_attention(q, keys, values, mask):
    """The adapter's attention as `leapc.tree_attention` (the runtime's masks are
    prefix-valid, as the op requires)."""
    return tree_attention(q, keys, values, past_lengths(mask), tree_part(mask),
                          q.shape[-1] ** -0.5)


def _attention_of(gm: GraphModule) -> Attend:
    lowered = any(n.target == TREE_ATTENTION for n in gm.graph.nodes)
    return _tree_attention if lowered else dense_attention


class _AdaptedDraft(torch.nn.Module):
    """The draft with Kangaroo's adapter between the exit's hidden state and the head."""

    def __init__(self, draft: GraphModule, adapter: KangarooAdapter, head: GraphModule):
        super().__init__()
        self.draft, self.adapter, self.head = draft, adapter, head
        self.attend = _attention_of(draft)

    def forward(self, tokens, positions, past, adapter_past, mask):
        hidden, present = self.draft(tokens, positions, past, mask)
        adapted, adapter_present = self.adapter(hidden, positions, adapter_past, mask,
                                                self.attend)
        return self.head(adapted, positions, past, mask)[0], present, hidden, adapter_present


@dataclass(frozen=True)
class SliceKangaroo:
    """Kangaroo's draft at ``exit_layer`` with the trained ``adapter``."""

    exit_layer: int
    adapter: KangarooAdapter
    name: ClassVar[str] = "slice_kangaroo"
    requires: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY}
    )
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.SIGNATURE, Invariant.KV_LAYERS}
    )

    def __call__(self, program: CapturedProgram) -> PassResult:
        check_exit_layer(self.exit_layer, program.dims.num_layers, self.name)
        anatomy = anatomy_of(program)
        gm = unlift(program)
        rows = layer_presents(gm, program.dims.num_layers)[:self.exit_layer]
        set_outputs(gm, [exit_hidden(gm, anatomy, self.exit_layer), stack_presents(gm, rows)])
        prune(gm)
        gm.recompile()
        signature = slice_signature(program, self.exit_layer,
                                    ("tokens", "positions", "past", ADAPTER_PAST, "mask"),
                                    ("logits", "present", HIDDEN_INPUT, ADAPTER_PRESENT))
        dims = dataclasses.replace(program.dims, num_layers=self.exit_layer)
        module = _AdaptedDraft(gm, self.adapter.eval(), slice_head(program))
        exported = export_step(module, dims, capture_options(program))
        return PassResult(CapturedProgram(exported, signature, dims), True)
