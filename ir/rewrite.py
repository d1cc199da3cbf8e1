"""The one way passes edit a program: unlift, rewrite the FX graph, re-export.

Unlifting (``ep.module()``) turns parameters, buffers and constants into ``get_attr``
nodes, so a pass can add weights with ``register_parameter``/``register_buffer`` and
new outputs by extending the output node. Re-exporting with the capture's dynamic shapes
gives back a validated `ExportedProgram` (node metadata, ``nn_module_stack`` included,
survives, so the anatomy still resolves afterwards).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.fx import GraphModule

from leapc.ir.capture import CaptureOptions, CapturedProgram, dynamic_shapes, example_inputs
from leapc.ir.signature import TensorSpec


def unlift(program: CapturedProgram) -> GraphModule:
    """A private, mutable copy of the program as a flat graph module."""
    return copy.deepcopy(program.program.module())


def set_outputs(gm: GraphModule, outputs: list[torch.fx.Node]) -> None:
    """Replace the graph's (flat tuple) outputs, keeping pytree codegen consistent."""
    out = gm.graph.output_node()
    out.args = (tuple(outputs),)
    codegen = gm.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(
        out_spec=torch.utils._pytree.tree_structure(tuple(range(len(outputs))))
    )


def reexport(
    gm: GraphModule,
    program: CapturedProgram,
    outputs: tuple[TensorSpec, ...] | None = None,
) -> CapturedProgram:
    """Export ``gm`` again with the program's dynamic shapes; ``outputs`` if they changed."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    options = CaptureOptions(
        max_seq=program.signature.max_seq,
        max_batch=program.signature.bounds["B"][1],
        max_new=program.signature.bounds["N"][1],
    )
    with torch.no_grad():
        exported = torch.export.export(
            gm, example_inputs(program.dims), dynamic_shapes=dynamic_shapes(options),
            strict=False,
        )
    signature = program.signature.with_outputs(outputs) if outputs else program.signature
    return CapturedProgram(exported, signature, program.dims)


def rewrite(program: CapturedProgram, edit: Callable[[GraphModule], bool]) -> tuple[CapturedProgram, bool]:
    """Apply ``edit`` (returns whether it changed anything) and re-export if it did."""
    gm = unlift(program)
    if not edit(gm):
        return program, False
    return reexport(gm, program), True
