"""Where a step program is cut for early exit, and the model's head as a graph (DESIGN §4).

The slice passes (`passes/slice_draft.py`, `slice_remainder.py`, `slice_kangaroo.py`)
share these, and Kangaroo's adapter training (`models/train_adapter.py`) needs the very
head the engine's draft runs, so they live in ir/, which both may import.

An exit at layer E reads the residual stream entering layer E (leaving layer E - 1);
the programs cut there get their own `StepSignature` and ``num_layers`` (E or L - E).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from leapc.ir import signature as sig
from leapc.ir.anatomy import Anatomy, anatomy_of
from leapc.ir.capture import ADAPTER_PAST, ADAPTER_PRESENT, HIDDEN_INPUT, CapturedProgram
from leapc.ir.errors import GraphError, InputError
from leapc.ir.graph import nodes_by_name, prune
from leapc.ir.rewrite import reexport, set_outputs, unlift

aten = torch.ops.aten


def check_exit_layer(exit_layer: int, num_layers: int, who: str) -> None:
    """The exit must leave at least one layer on each side of the cut."""
    if not 1 <= exit_layer < num_layers:
        raise InputError(f"{who}: exit layer {exit_layer} is out of range for a "
                         f"{num_layers}-layer model (1 to {num_layers - 1})")


def exit_hidden(gm: GraphModule, anatomy: Anatomy, exit_layer: int) -> Node:
    """The residual stream entering layer ``exit_layer`` (leaving layer ``exit_layer - 1``)."""
    return nodes_by_name(gm)[anatomy.layers[exit_layer].residual_in]


def take_hidden(gm: GraphModule, residual: Node) -> None:
    """Replace ``tokens`` by a ``hidden`` input that stands for ``residual``; sizes read
    from ``tokens`` (B, N, see `ir.rewrite.unlift`) are read from ``hidden`` instead.
    What only ``tokens`` fed (the embedding, the layers before ``residual``) is pruned."""
    tokens = nodes_by_name(gm)["tokens"]
    with gm.graph.inserting_before(tokens):
        hidden = gm.graph.placeholder(HIDDEN_INPUT)
    residual.replace_all_uses_with(hidden)
    for user in list(tokens.users):
        if user.target == aten.sym_size.int:
            user.replace_input_with(tokens, hidden)
    prune(gm)
    if tokens.users:
        raise GraphError(f"ops after the cut read the tokens "
                         f"({', '.join(u.name for u in tokens.users)})")
    gm.graph.erase_node(tokens)
    codegen = gm.graph._codegen  # the generated forward's argument names
    codegen.pytree_info = codegen.pytree_info._replace(
        orig_args=[HIDDEN_INPUT, *codegen.pytree_info.orig_args[1:]])


def slice_head(program: CapturedProgram) -> GraphModule:
    """The model's head (final norm to logits) as ``(hidden, positions, past, mask) ->
    (logits,)``; only ``hidden`` is read (the residual leaving the last layer)."""
    anatomy = anatomy_of(program)
    gm = unlift(program)
    set_outputs(gm, [gm.graph.output_node().args[0][0]])
    take_hidden(gm, nodes_by_name(gm)[anatomy.layers[-1].residual_out])
    gm.recompile()
    return gm


def slice_signature(program: CapturedProgram, layers: int, inputs: tuple[str, ...],
                    outputs: tuple[str, ...]) -> sig.StepSignature:
    """The program's signature with ``past``/``present`` over ``layers`` layers, and the
    given input and output names (specs of names the step program lacks: ``hidden``, the
    adapter's one-layer KV)."""
    dims = program.dims
    hidden = sig.TensorSpec(HIDDEN_INPUT, dims.dtype, (sig.B, sig.N, dims.hidden_size))
    specs = {s.name: s for s in (*program.signature.inputs, *program.signature.outputs, hidden)}
    for name, adapter in (("past", ADAPTER_PAST), ("present", ADAPTER_PRESENT)):
        specs[adapter] = dataclasses.replace(specs[name], name=adapter,
                                             shape=(1, *specs[name].shape[1:]))
        specs[name] = dataclasses.replace(specs[name], shape=(layers, *specs[name].shape[1:]))
    return dataclasses.replace(program.signature, inputs=tuple(specs[n] for n in inputs),
                               outputs=tuple(specs[n] for n in outputs))


def export_slice(gm: GraphModule, program: CapturedProgram, layers: int,
                 inputs: tuple[str, ...], outputs: tuple[str, ...]) -> CapturedProgram:
    """Re-export the cut graph ``gm`` of ``program`` as a program of ``layers`` layers."""
    signature = slice_signature(program, layers, inputs, outputs)
    dims = dataclasses.replace(program.dims, num_layers=layers)
    # reexport reads the bounds and dims of the program it is given: the slice's.
    return reexport(gm, CapturedProgram(program.program, signature, dims))
