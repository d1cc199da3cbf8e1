"""Add an early exit: the model's own final norm and LM head read after layer E (DESIGN §4).

``exit_logits [B, N, V]`` are the logits of the model cut after its first E layers, the
draft distribution of LayerSkip-style self-speculation. The exit is a copy of the graph
between the last layer's residual output and the ``logits`` output (final norm, LM head,
and whatever the family puts between them), reading layer E's residual input instead, so
it shares the norm and head weights and needs no knowledge of the family. A trained
adapter (Kangaroo) would go between that residual and the copy: `exit_head` takes the
hidden state it reads.

`passes/slice_early_exit.py` cuts the same exit into a draft and a remainder program.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch.fx import GraphModule, Node

from leapc.ir.anatomy import Anatomy, descendants, recover_anatomy
from leapc.ir.capture import CapturedProgram
from leapc.ir.errors import InputError
from leapc.ir.rewrite import reexport, set_outputs, unlift
from leapc.passes.base import Invariant, PassError, PassResult

EXIT_OUTPUT = "exit_logits"


def check_exit_layer(exit_layer: int, num_layers: int, who: str) -> None:
    """The exit must leave at least one layer on each side of the cut."""
    if not 1 <= exit_layer < num_layers:
        raise InputError(f"{who}: exit layer {exit_layer} is out of range for a "
                         f"{num_layers}-layer model (1 to {num_layers - 1})")


def anatomy_of(program: CapturedProgram) -> Anatomy:
    return recover_anatomy(program.program, program.dims.num_layers, program.dims.hidden_size)


def graph_nodes(gm: GraphModule) -> dict[str, Node]:
    return {n.name: n for n in gm.graph.nodes}


def _ancestors(node: Node) -> set[Node]:
    seen, todo = set(), [node]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def exit_head(gm: GraphModule, anatomy: Anatomy, hidden: Node) -> Node:
    """Logits computed from ``hidden`` by a copy of the model's head (final norm to logits).

    The head is every node that both depends on the last layer's residual output and
    feeds the ``logits`` output; weights, constants and sizes it reads are shared.
    """
    nodes = graph_nodes(gm)
    last = nodes[anatomy.layers[-1].residual_out]
    logits = gm.graph.output_node().args[0][0]
    head = descendants(last) & (_ancestors(logits) | {logits})
    if not {nodes[anatomy.final_norm], nodes[anatomy.lm_head]} <= head:
        raise PassError("insert_early_exit: the final norm and LM head are not between the "
                        "last layer and the logits output")
    copies = {last: hidden}
    with gm.graph.inserting_before(gm.graph.output_node()):
        for node in [n for n in gm.graph.nodes if n in head]:  # graph order is topological
            copies[node] = gm.graph.node_copy(node, lambda arg: copies.get(arg, arg))
    return copies[logits]


def exit_hidden(gm: GraphModule, anatomy: Anatomy, exit_layer: int) -> Node:
    """The residual stream entering layer ``exit_layer`` (leaving layer ``exit_layer - 1``)."""
    return graph_nodes(gm)[anatomy.layers[exit_layer].residual_in]


@dataclass(frozen=True)
class InsertEarlyExit:
    """Append ``exit_logits [B, N, V]``: the model's head applied after ``exit_layer`` layers."""

    exit_layer: int
    name: ClassVar[str] = "insert_early_exit"
    requires: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY}
    )
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY}
    )

    def __post_init__(self):
        if not isinstance(self.exit_layer, int) or self.exit_layer < 1:
            raise InputError(f"{self.name}: exit layer must be a positive integer, "
                             f"not {self.exit_layer!r}")

    def __call__(self, program: CapturedProgram) -> PassResult:
        check_exit_layer(self.exit_layer, program.dims.num_layers, self.name)
        specs = program.signature.outputs
        if any(s.name == EXIT_OUTPUT for s in specs):
            raise PassError(f"{self.name}: the program already has an {EXIT_OUTPUT} output")
        anatomy = anatomy_of(program)
        gm = unlift(program)
        exit_logits = exit_head(gm, anatomy, exit_hidden(gm, anatomy, self.exit_layer))
        set_outputs(gm, [*gm.graph.output_node().args[0], exit_logits])
        exit_spec = dataclasses.replace(program.signature.spec("logits"), name=EXIT_OUTPUT)
        return PassResult(reexport(gm, program, (*specs, exit_spec)), True)
