"""Remove ops that return their input unchanged.

Captured transformers code is full of them: RMSNorm casts float32 to float32,
`DynamicCache` starts each layer by concatenating an empty tensor with the past, and the
logits slice leaves an ``alias``. They cost a kernel launch (or an allocation) each at run
time on eager backends. (``_assert_tensor_metadata`` nodes are left: export re-inserts
one before every remaining cast.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from leapc.ir.capture import CapturedProgram
from leapc.ir.graph import is_empty_1d, is_noop
from leapc.ir.rewrite import rewrite
from leapc.passes.base import Invariant, PassResult

aten = torch.ops.aten


def _remove(gm: GraphModule, node: Node) -> None:
    if node.target == aten.cat.default:
        kept = [t for t in node.args[0] if not is_empty_1d(t)]
        if len(kept) > 1:  # still a real concatenation, minus the empty operands
            node.args = (kept, *node.args[1:])
            return
        node.replace_all_uses_with(kept[0])
    else:
        node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


@dataclass(frozen=True)
class RemoveNoopOps:
    name: ClassVar[str] = "remove_noop_ops"
    requires: ClassVar[frozenset[Invariant]] = frozenset({Invariant.STEP_CONTRACT})
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.NO_NOOP_OPS}
    )

    def __call__(self, program: CapturedProgram) -> PassResult:
        def edit(gm: GraphModule) -> bool:
            noops = [n for n in gm.graph.nodes if is_noop(n)]
            for node in noops:
                _remove(gm, node)
            return bool(noops)

        return PassResult(*rewrite(program, edit))
