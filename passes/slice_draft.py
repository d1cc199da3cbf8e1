"""Cut the early-exit draft out of a step program: layers < E and an exit (DESIGN §4).

LayerSkip-style self-speculation drafts with the first E layers and the model's own head,
then verifies with the rest (`slice_remainder`), reusing what the draft computed:
``(tokens, positions, past [E, ...], mask) -> (logits [B, N, V], present [E, ...],
hidden [B, N, H])``. ``present`` is exactly the full program's ``present[:E]`` (the same
nodes), so the draft's KV rows of accepted tokens are the target's and go to the cache
as they are; ``hidden`` is the residual stream entering layer E, the remainder's input.

The exit is a copy of the graph between the last layer's residual output and ``logits``
(final norm, LM head, whatever the family puts between them) reading layer E's residual
input instead: it shares the norm and head weights and needs no knowledge of the family.
Run on the engine pipeline's final program, so the draft keeps its rewrites; it keeps
the step contract (plus ``hidden``) and its anatomy, so passes can run on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch.fx import GraphModule, Node

from leapc.ir.anatomy import Anatomy, anatomy_of
from leapc.ir.capture import HIDDEN_INPUT, STEP_INPUTS, CapturedProgram
from leapc.ir.early_exit import check_exit_layer, exit_hidden, export_slice
from leapc.ir.graph import (
    ancestors,
    descendants,
    layer_presents,
    nodes_by_name,
    prune,
    stack_presents,
)
from leapc.ir.rewrite import set_outputs, unlift
from leapc.passes.base import Invariant, PassError, PassResult


@dataclass(frozen=True)
class SliceDraft:
    """Layers < ``exit_layer`` and the exit: ``logits`` are the exit logits, ``present``
    the full program's ``present[:exit_layer]``, ``hidden`` the residual entering it."""

    exit_layer: int
    name: ClassVar[str] = "slice_draft"
    requires: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY}
    )
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY, Invariant.KV_LAYERS}
    )

    def __call__(self, program: CapturedProgram) -> PassResult:
        check_exit_layer(self.exit_layer, program.dims.num_layers, self.name)
        anatomy = anatomy_of(program)
        gm = unlift(program)
        hidden = exit_hidden(gm, anatomy, self.exit_layer)
        rows = layer_presents(gm, program.dims.num_layers)[:self.exit_layer]
        set_outputs(gm, [_exit_head(gm, anatomy, hidden), stack_presents(gm, rows), hidden])
        prune(gm)
        draft = export_slice(gm, program, self.exit_layer, STEP_INPUTS,
                             ("logits", "present", HIDDEN_INPUT))
        return PassResult(draft, True)


def _exit_head(gm: GraphModule, anatomy: Anatomy, hidden: Node) -> Node:
    """Logits computed from ``hidden`` by a copy of the model's head (final norm to logits).

    The head is every node that both depends on the last layer's residual output and
    feeds the ``logits`` output; weights, constants and sizes it reads are shared.
    """
    nodes = nodes_by_name(gm)
    last = nodes[anatomy.layers[-1].residual_out]
    logits = gm.graph.output_node().args[0][0]
    head = descendants(last) & (ancestors(logits) | {logits})
    if not {nodes[anatomy.final_norm], nodes[anatomy.lm_head]} <= head:
        raise PassError("slice_draft: the final norm and LM head are not between the last "
                        "layer and the logits output")
    copies = {last: hidden}
    with gm.graph.inserting_before(gm.graph.output_node()):
        for node in [n for n in gm.graph.nodes if n in head]:  # graph order is topological
            copies[node] = gm.graph.node_copy(node, lambda arg: copies.get(arg, arg))
    return copies[logits]
