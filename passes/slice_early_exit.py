"""Cut a step program at an early exit into a draft and a remainder program (DESIGN §4).

LayerSkip-style self-speculation drafts with the first E layers and verifies with the
rest, reusing what the draft computed:

- ``slice_draft``: layers < E and the exit. ``(tokens, positions, past [E, ...], mask) ->
  (logits [B, N, V], present [E, ...], hidden [B, N, H])``; ``present`` is exactly the
  full program's ``present[:E]`` (the same nodes), so the draft's KV rows of accepted
  tokens are the target's and go to the cache as they are; ``hidden`` enters layer E.
- ``slice_remainder``: layers >= E. ``(hidden, positions, past [L - E, ...], mask) ->
  (logits, present [L - E, ...])``, equal to the full program's logits and ``present[E:]``
  when ``hidden`` is the draft's.

Both are graph surgery on the captured program through the anatomy: the output
``present`` is re-stacked from the kept layers' rows, the remainder's residual input is
replaced by a ``hidden`` input, its layers read ``past`` re-indexed from 0, and what no
output needs any more (the other layers, the embedding, the original head) is dropped.
They are not passes: their programs no longer follow the step contract. Slice the
pipeline's final program: ``ir.rewrite.unlift`` expects a ``tokens`` input, so passes do
not run on a remainder, and the anatomy does not resolve on it (no embedding; its layers
are numbered from E).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from leapc.ir import signature as sig
from leapc.ir.adapter import KangarooAdapter
from leapc.ir.capture import (
    ADAPTER_PAST,
    ADAPTER_PRESENT,
    HIDDEN_INPUT,
    CapturedProgram,
    export_step,
)
from leapc.ir.rewrite import capture_options, reexport, set_outputs, unlift
from leapc.passes.base import PassError
from leapc.passes.insert_early_exit import (
    anatomy_of,
    check_exit_layer,
    exit_head,
    exit_hidden,
    graph_nodes,
)

aten = torch.ops.aten


def _layer_presents(gm: GraphModule, num_layers: int) -> list[Node]:
    """Each layer's ``[2, B, Hkv, N, Dh]`` rows, from the capture's ``stack`` of them."""
    present = gm.graph.output_node().args[0][1]
    if present.target != aten.stack.default or len(present.args[0]) != num_layers \
            or present.kwargs.get("dim", 0) != 0 or len(present.args) > 1:
        raise PassError(f"slice_early_exit: the present output is not a stack of "
                        f"{num_layers} layers ({present.format_node()})")
    return list(present.args[0])


def _stack(gm: GraphModule, layers: list[Node]) -> Node:
    with gm.graph.inserting_before(gm.graph.output_node()):
        return gm.graph.call_function(aten.stack.default, (layers,))


def _prune(gm: GraphModule) -> None:
    """Drop what no output needs, weights included (export would keep every parameter of
    the module as a program input, so a draft would carry the whole model).

    FX keeps an unused SDPA (dropout makes it "random") and export's metadata asserts
    as side effects; the graph is functional, and re-export inserts the asserts again
    for what is left.
    """
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    weights = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for name, _ in weights:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)


def _slice_signature(program: CapturedProgram, layers: int, inputs, outputs) -> sig.StepSignature:
    """The program's signature with ``past``/``present`` over ``layers`` layers, and the
    given input and output names (specs of names the step program lacks: ``hidden``)."""
    dims = program.dims
    hidden = sig.TensorSpec(HIDDEN_INPUT, dims.dtype, (sig.B, sig.N, dims.hidden_size))
    specs = {s.name: s for s in (*program.signature.inputs, *program.signature.outputs, hidden)}
    for name, adapter in (("past", ADAPTER_PAST), ("present", ADAPTER_PRESENT)):
        specs[adapter] = dataclasses.replace(specs[name], name=adapter,
                                             shape=(1, *specs[name].shape[1:]))
        specs[name] = dataclasses.replace(specs[name], shape=(layers, *specs[name].shape[1:]))
    return dataclasses.replace(program.signature, inputs=tuple(specs[n] for n in inputs),
                               outputs=tuple(specs[n] for n in outputs))


def _export(gm: GraphModule, program: CapturedProgram, layers: int, inputs, outputs):
    signature = _slice_signature(program, layers, inputs, outputs)
    dims = dataclasses.replace(program.dims, num_layers=layers)
    # reexport reads the bounds and dims of the program it is given: the slice's.
    return reexport(gm, CapturedProgram(program.program, signature, dims))


def slice_draft(program: CapturedProgram, exit_layer: int) -> CapturedProgram:
    """Layers < ``exit_layer`` and the exit: ``logits`` are the exit logits, ``present``
    the full program's ``present[:exit_layer]``, ``hidden`` the residual entering it."""
    check_exit_layer(exit_layer, program.dims.num_layers, "slice_draft")
    anatomy = anatomy_of(program)
    gm = unlift(program)
    hidden = exit_hidden(gm, anatomy, exit_layer)
    layers = _layer_presents(gm, program.dims.num_layers)[:exit_layer]
    set_outputs(gm, [exit_head(gm, anatomy, hidden), _stack(gm, layers), hidden])
    _prune(gm)
    return _export(gm, program, exit_layer, ("tokens", "positions", "past", "mask"),
                   ("logits", "present", HIDDEN_INPUT))


class _AdaptedDraft(torch.nn.Module):
    """The draft with Kangaroo's adapter between the exit's hidden state and the head."""

    def __init__(self, draft: GraphModule, adapter: KangarooAdapter, head: GraphModule):
        super().__init__()
        self.draft, self.adapter, self.head = draft, adapter, head

    def forward(self, tokens, positions, past, adapter_past, mask):
        hidden, present = self.draft(tokens, positions, past, mask)
        adapted, adapter_present = self.adapter(hidden, positions, adapter_past, mask)
        return self.head(adapted, positions, past, mask)[0], present, hidden, adapter_present


def slice_kangaroo(program: CapturedProgram, exit_layer: int,
                   adapter: KangarooAdapter) -> CapturedProgram:
    """Kangaroo's draft: layers < ``exit_layer``, the adapter, then the model's head.
    ``(tokens, positions, past [E, ...], adapter_past [1, ...], mask) -> (logits, present
    [E, ...], hidden, adapter_present [1, ...])``: ``present`` and ``hidden`` as
    `slice_draft`'s, ``adapter_present`` the adapter's own KV rows."""
    check_exit_layer(exit_layer, program.dims.num_layers, "slice_kangaroo")
    anatomy = anatomy_of(program)
    gm = unlift(program)
    layers = _layer_presents(gm, program.dims.num_layers)[:exit_layer]
    set_outputs(gm, [exit_hidden(gm, anatomy, exit_layer), _stack(gm, layers)])
    _prune(gm)
    gm.recompile()
    signature = _slice_signature(program, exit_layer,
                                 ("tokens", "positions", "past", ADAPTER_PAST, "mask"),
                                 ("logits", "present", HIDDEN_INPUT, ADAPTER_PRESENT))
    dims = dataclasses.replace(program.dims, num_layers=exit_layer)
    module = _AdaptedDraft(gm, adapter.eval(), slice_head(program))
    return CapturedProgram(export_step(module, dims, capture_options(program)), signature, dims)


def slice_head(program: CapturedProgram) -> GraphModule:
    """The model's head (final norm to logits) as ``(hidden, positions, past, mask) ->
    (logits,)``; only ``hidden`` is read (the residual leaving the last layer)."""
    anatomy = anatomy_of(program)
    gm = unlift(program)
    set_outputs(gm, [gm.graph.output_node().args[0][0]])
    _take_hidden(gm, graph_nodes(gm)[anatomy.layers[-1].residual_out])
    gm.recompile()
    return gm


def _take_hidden(gm: GraphModule, residual: Node) -> None:
    """Replace ``tokens`` by a ``hidden`` input that stands for ``residual``; sizes read
    from ``tokens`` (B, N, see `ir.rewrite.unlift`) are read from ``hidden`` instead."""
    tokens = graph_nodes(gm)["tokens"]
    with gm.graph.inserting_before(tokens):
        hidden = gm.graph.placeholder(HIDDEN_INPUT)
    residual.replace_all_uses_with(hidden)
    for user in list(tokens.users):
        if user.target == aten.sym_size.int:
            user.replace_input_with(tokens, hidden)
    _prune(gm)
    if tokens.users:
        raise PassError(f"slice_remainder: layers after the exit read the tokens "
                        f"({', '.join(u.name for u in tokens.users)})")
    gm.graph.erase_node(tokens)
    codegen = gm.graph._codegen  # the generated forward's argument names
    codegen.pytree_info = codegen.pytree_info._replace(
        orig_args=[HIDDEN_INPUT, *codegen.pytree_info.orig_args[1:]])


def _shift_past(gm: GraphModule, exit_layer: int) -> None:
    """Layer i >= E reads ``past[i - E]``: the remainder's past holds layers E.. only."""
    for user in list(graph_nodes(gm)["past"].users):
        if user.target == aten.sym_size.int:
            continue
        if user.target != aten.select.int or user.args[1] != 0 or user.args[2] < exit_layer:
            raise PassError(f"slice_remainder: unexpected use of past after the cut: "
                            f"{user.format_node()}")
        user.args = (user.args[0], 0, user.args[2] - exit_layer)


def slice_remainder(program: CapturedProgram, exit_layer: int) -> CapturedProgram:
    """Layers >= ``exit_layer`` from the residual stream entering that layer."""
    check_exit_layer(exit_layer, program.dims.num_layers, "slice_remainder")
    anatomy = anatomy_of(program)
    gm = unlift(program)
    logits, _ = gm.graph.output_node().args[0][:2]
    layers = _layer_presents(gm, program.dims.num_layers)[exit_layer:]
    set_outputs(gm, [logits, _stack(gm, layers)])
    _take_hidden(gm, exit_hidden(gm, anatomy, exit_layer))
    _shift_past(gm, exit_layer)
    return _export(gm, program, program.dims.num_layers - exit_layer,
                   (HIDDEN_INPUT, "positions", "past", "mask"), ("logits", "present"))
