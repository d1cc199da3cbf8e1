"""The pass contract: frozen dataclasses with a name, required and ensured invariants.

A pass maps a whole `CapturedProgram` (the `ExportedProgram` plus its `StepSignature`,
which a pass that adds outputs must extend) to a `PassResult`; it never mutates its
input. Invariants are checked by the pipeline, not by the passes themselves.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from leapc.ir.anatomy import anatomy_of, is_attention
from leapc.ir.capture import STEP_INPUTS, STEP_OUTPUTS, CapturedProgram
from leapc.ir.errors import UnsupportedModelError
from leapc.ir.graph import MaskForm, constant_placeholders, is_noop, sdpa_mask_form


class PassError(Exception):
    """A pass failed or broke an invariant: an internal error naming the pass."""


@dataclass(frozen=True)
class PassResult:
    program: CapturedProgram
    modified: bool


class Invariant(enum.Enum):
    SIGNATURE = "the graph's inputs and outputs are those its StepSignature declares"
    STEP_CONTRACT = "inputs are (tokens, positions, past, mask); outputs start (logits, present)"
    KV_LAYERS = "past and present hold dims.num_layers layers, in the graph and the signature"
    HAS_ANATOMY = "embedding, layers, final norm and LM head are recoverable"
    NO_NOOP_OPS = "no identity casts, aliases or empty concatenations"
    CONSTANTS_FOLDED = "no op computes from constants alone"
    TREE_ATTENTION = ("every attention op under the step mask is leapc.tree_attention "
                      "(sliding-window layers may keep dense attention)")


class Pass(Protocol):
    name: ClassVar[str]
    requires: ClassVar[frozenset[Invariant]]
    ensures: ClassVar[frozenset[Invariant]]

    def __call__(self, program: CapturedProgram) -> PassResult: ...


# ------------------------------------------------------------------ invariant checks


def _signature(p: CapturedProgram) -> str | None:
    graph = p.program.graph_signature
    inputs = [s.name for s in p.signature.inputs]
    outputs = [s.name for s in p.signature.outputs]
    if list(graph.user_inputs) != inputs:
        return f"graph inputs are {list(graph.user_inputs)} but the signature declares {inputs}"
    if len(graph.user_outputs) != len(outputs):
        return f"{len(graph.user_outputs)} graph outputs but the signature declares {outputs}"
    return None


def _step_contract(p: CapturedProgram) -> str | None:
    names = [s.name for s in p.signature.outputs]
    if tuple(p.program.graph_signature.user_inputs) != STEP_INPUTS:
        return f"user inputs are {list(p.program.graph_signature.user_inputs)}"
    if tuple(names[:2]) != STEP_OUTPUTS:
        return f"outputs are {names}"
    return _signature(p)


def _kv_layers(p: CapturedProgram) -> str | None:
    graph = p.program.graph_signature
    nodes = {n.name: n for n in p.program.graph.nodes}
    outputs = dict(zip([s.name for s in p.signature.outputs], graph.user_outputs, strict=False))
    layers = {"past": nodes["past"].meta["val"].shape[0],
              "present": nodes[outputs["present"]].meta["val"].shape[0]}
    for name, found in layers.items():
        declared = p.signature.spec(name).shape[0]
        if not found == declared == p.dims.num_layers:
            return (f"{name} holds {found} layers, the signature declares {declared}, "
                    f"the dims {p.dims.num_layers}")
    return None


def _has_anatomy(p: CapturedProgram) -> str | None:
    try:
        anatomy_of(p)
    except UnsupportedModelError as err:
        return str(err)
    return None


def _no_noop_ops(p: CapturedProgram) -> str | None:
    noops = [n.name for n in p.program.graph.nodes if is_noop(n)]
    return f"no-op nodes remain: {noops[:5]}" if noops else None


def _constants_folded(p: CapturedProgram) -> str | None:
    consts = constant_placeholders(p.program)
    foldable = [n.name for n in p.program.graph.nodes
                if n.op == "call_function" and n.all_input_nodes
                and all(a in consts for a in n.all_input_nodes)
                and isinstance(n.meta.get("val"), torch.Tensor)
                and not _is_parameter_view(n, p)]
    return f"constant-only nodes remain: {foldable[:5]}" if foldable else None


def _tree_attention(p: CapturedProgram) -> str | None:
    ops = [n for n in p.program.graph.nodes if is_attention(n)]
    mask = next(n for n in p.program.graph.nodes if n.op == "placeholder" and n.name == "mask")
    dense = [n for n in ops if n.target.name() != "leapc::tree_attention"
             and sdpa_mask_form(n, mask) is not MaskForm.NARROWED]
    if dense or not ops:
        return f"{len(dense)} of {len(ops)} attention ops are dense (SDPA or capped) under the step mask"
    return None


def _is_parameter_view(node, p: CapturedProgram) -> bool:
    """Ops on trainable weights stay in the graph (folding them would copy the weights)."""
    params = p.program.graph_signature.inputs_to_parameters
    return any(a.name in params for a in node.all_input_nodes)


CHECKS: dict[Invariant, Callable[[CapturedProgram], str | None]] = {
    Invariant.SIGNATURE: _signature,
    Invariant.STEP_CONTRACT: _step_contract,
    Invariant.KV_LAYERS: _kv_layers,
    Invariant.HAS_ANATOMY: _has_anatomy,
    Invariant.NO_NOOP_OPS: _no_noop_ops,
    Invariant.CONSTANTS_FOLDED: _constants_folded,
    Invariant.TREE_ATTENTION: _tree_attention,
}


def violation(invariant: Invariant, program: CapturedProgram) -> str | None:
    return CHECKS[invariant](program)
