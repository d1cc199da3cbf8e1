"""Cut the early-exit remainder out of a step program: layers >= E (DESIGN §4).

``(hidden, positions, past [L - E, ...], mask) -> (logits, present [L - E, ...])``, equal
to the full program's logits and ``present[E:]`` when ``hidden`` is the draft's
(`slice_draft`): self-speculation verifies with it, skipping the layers the draft ran.

The residual entering layer E becomes the ``hidden`` input (B and N are read from it),
the layers read ``past`` re-indexed from 0, ``present`` is re-stacked from the kept
layers, and what no output needs (the layers before E, the embedding) is dropped. The
result leaves the step contract (no ``tokens``) and its anatomy does not resolve (no
embedding, layers numbered from E): no pass runs after this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule

from leapc.ir.anatomy import anatomy_of
from leapc.ir.capture import HIDDEN_INPUT, STEP_OUTPUTS, CapturedProgram
from leapc.ir.early_exit import check_exit_layer, exit_hidden, export_slice, take_hidden
from leapc.ir.graph import layer_presents, nodes_by_name, stack_presents
from leapc.ir.rewrite import set_outputs, unlift
from leapc.passes.base import Invariant, PassError, PassResult

aten = torch.ops.aten


@dataclass(frozen=True)
class SliceRemainder:
    """Layers >= ``exit_layer`` from the residual stream entering that layer."""

    exit_layer: int
    name: ClassVar[str] = "slice_remainder"
    requires: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY}
    )
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.SIGNATURE, Invariant.KV_LAYERS}
    )

    def __call__(self, program: CapturedProgram) -> PassResult:
        layers = program.dims.num_layers
        check_exit_layer(self.exit_layer, layers, self.name)
        anatomy = anatomy_of(program)
        gm = unlift(program)
        logits = gm.graph.output_node().args[0][0]
        rows = layer_presents(gm, layers)[self.exit_layer:]
        set_outputs(gm, [logits, stack_presents(gm, rows)])
        take_hidden(gm, exit_hidden(gm, anatomy, self.exit_layer))
        _shift_past(gm, self.exit_layer)
        remainder = export_slice(gm, program, layers - self.exit_layer,
                                 (HIDDEN_INPUT, "positions", "past", "mask"), STEP_OUTPUTS)
        return PassResult(remainder, True)


def _shift_past(gm: GraphModule, exit_layer: int) -> None:
    """Layer i >= E reads ``past[i - E]``: the remainder's past holds layers E.. only."""
    for user in list(nodes_by_name(gm)["past"].users):
        if user.target == aten.sym_size.int:
            continue
        if user.target != aten.select.int or user.args[1] != 0 or user.args[2] < exit_layer:
            raise PassError(f"slice_remainder: unexpected use of past after the cut: "
                            f"{user.format_node()}")
        user.args = (user.args[0], 0, user.args[2] - exit_layer)
