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
from leapc.ir.rewrite import rewrite
from leapc.passes.base import Invariant, PassResult

aten = torch.ops.aten
_IDENTITIES = (aten.alias.default, aten.detach.default, aten.detach_.default,
               aten.lift_fresh_copy.default)
_CASTS = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default)


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is_empty_1d(node) -> bool:
    val = _val(node)
    return val is not None and val.ndim == 1 and val.shape[0] == 0


def _is_identity_cast(node: Node) -> bool:
    src, out = _val(node.args[0]), _val(node)
    return (src is not None and out is not None and src.dtype == out.dtype
            and src.device == out.device)


def is_noop(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _IDENTITIES:
        return True
    if node.target in _CASTS:
        return _is_identity_cast(node)
    if node.target == aten.cat.default:
        return any(_is_empty_1d(t) for t in node.args[0])
    return False


def _remove(gm: GraphModule, node: Node) -> None:
    if node.target == aten.cat.default:
        kept = [t for t in node.args[0] if not _is_empty_1d(t)]
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
