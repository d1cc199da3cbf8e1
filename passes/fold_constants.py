"""Evaluate, at build time, every op whose inputs are all constants.

In captured models these are e.g. RoPE's ``inv_freq[None, :, None].float()`` and the
lifted empty tensors a `DynamicCache` starts from. Ops reading trainable weights are
left alone: folding ``weight.T`` would store a second copy of the weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from leapc.ir.capture import CapturedProgram
from leapc.ir.rewrite import rewrite
from leapc.passes.base import Invariant, PassResult


def _foldable(node: Node, constants: dict[Node, torch.Tensor], params: set[str]) -> bool:
    if node.op != "call_function" or not node.all_input_nodes:
        return False
    if not all(a in constants for a in node.all_input_nodes):
        return False
    if any(a.op == "get_attr" and a.target in params for a in node.all_input_nodes):
        return False
    return isinstance(node.meta.get("val"), torch.Tensor)


def _fold(gm: GraphModule) -> bool:
    params = {name for name, _ in gm.named_parameters()}
    constants: dict[Node, torch.Tensor] = {
        n: gm.get_parameter(n.target) if n.target in params else getattr_path(gm, n.target)
        for n in gm.graph.nodes if n.op == "get_attr"
    }
    folded = []
    for node in gm.graph.nodes:
        if _foldable(node, constants, params):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: constants[a])
            constants[node] = node.target(*args, **kwargs).detach().clone()
            folded.append(node)
    live = [n for n in folded if any(u not in folded for u in n.users)]
    for i, node in enumerate(live):
        name = f"_folded_constant_{i}"
        gm.register_buffer(name, constants[node])
        with gm.graph.inserting_before(node):
            replacement = gm.graph.get_attr(name)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
    for node in reversed(folded):  # erase even "impure" ones (detach_ on a constant)
        if not node.users:
            gm.graph.erase_node(node)
    return bool(folded)


def getattr_path(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class FoldConstants:
    name: ClassVar[str] = "fold_constants"
    requires: ClassVar[frozenset[Invariant]] = frozenset({Invariant.STEP_CONTRACT})
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.CONSTANTS_FOLDED}
    )

    def __call__(self, program: CapturedProgram) -> PassResult:
        return PassResult(*rewrite(program, _fold))
