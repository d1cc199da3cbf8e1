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

from leapc.ir.capture import CapturedProgram, CaptureOptions, export_step
from leapc.ir.signature import TensorSpec

# Where each symbolic dim is read from: (input, axis) -> the canonical (input, axis).
_CANONICAL_DIMS = {
    ("positions", 0): ("tokens", 0), ("positions", 1): ("tokens", 1),
    ("mask", 0): ("tokens", 0), ("mask", 1): ("tokens", 1), ("past", 2): ("tokens", 0),
}


def unlift(program: CapturedProgram) -> GraphModule:
    """A private, mutable copy of the program as a flat graph module.

    Without input guards: re-export traces with every dim >= 2, so the guard
    ``T + N <= max_seq`` would otherwise narrow T to ``max_seq - 2``; the re-export
    declares the same bounds again anyway.
    """
    gm = copy.deepcopy(program.program.module(check_guards=False))
    _canonicalize_sizes(gm)
    return gm


def _canonicalize_sizes(gm: GraphModule) -> None:
    """Read B and N from ``tokens`` only.

    Re-tracing sees ``mask.size(0)`` and ``tokens.size(0)`` as separate symbols until
    the declared dims unify them; a reshape between them then records spurious guards
    such as ``B != N * B`` (which refuses N = 1). One source per dim avoids that.
    """
    inputs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.sym_size.int:
            continue
        source, axis = node.args
        canonical = _CANONICAL_DIMS.get((source.name, axis))
        if canonical:
            node.args = (inputs[canonical[0]], canonical[1])


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
    exported = export_step(gm, program.dims, capture_options(program))
    signature = program.signature.with_outputs(outputs) if outputs else program.signature
    return CapturedProgram(exported, signature, program.dims)


def capture_options(program: CapturedProgram) -> CaptureOptions:
    """The options ``program`` was captured with (its bounds)."""
    signature = program.signature
    return CaptureOptions(max_seq=signature.max_seq, max_batch=signature.bounds["B"][1],
                          max_new=signature.bounds["N"][1])


def rewrite(program: CapturedProgram, edit: Callable[[GraphModule], bool]) -> tuple[CapturedProgram, bool]:
    """Apply ``edit`` (returns whether it changed anything) and re-export if it did."""
    gm = unlift(program)
    if not edit(gm):
        return program, False
    return reexport(gm, program), True
