"""Bypass attention and MLP sublayers: the layer-skip draft of Draft&Verify and SWIFT (DESIGN §4).

A decoder layer is two residual branches, ``mid = residual_in + attention(...)`` and
``residual_out = mid + mlp(...)`` (the anatomy's landmarks). Skipping a branch makes its
add return its residual input, so the model computes the rest as if that sublayer were
absent. A skipped attention sublayer writes zeros as its ``present`` rows: a draft's KV
rows are scratch the runtime never commits, and ``past``/``present`` keep the step
contract's shape, so the draft reads the target's cache as it is.

One `SkipSet` is baked in and what no output needs any more (the skipped sublayers'
weights included) is pruned: the ``skip_<i>`` programs of ``layer-skip`` and ``swift``.

It runs in a pipeline of its own on the engine pipeline's final program, keeping its
attention lowering, as the early-exit slices do: its logits differ from the model's on
purpose, so `check_numerics` (which compares with the source model) is not run on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from leapc.ir.anatomy import Anatomy, LayerAnatomy, anatomy_of
from leapc.ir.capture import CapturedProgram
from leapc.ir.errors import UnsupportedModelError
from leapc.ir.graph import layer_presents, nodes_by_name, prune, stack_presents
from leapc.ir.rewrite import reexport, set_outputs, unlift
from leapc.ir.skip_spec import SkipSet
from leapc.passes.base import Invariant, PassResult

aten = torch.ops.aten


@dataclass(frozen=True)
class SkipLayers:
    """A draft program with ``skip``'s sublayers bypassed."""

    skip: SkipSet = SkipSet()
    name: ClassVar[str] = "skip_layers"
    requires: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY}
    )
    # Not HAS_ANATOMY: a layer without its attention op is not found as a layer.
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.KV_LAYERS}
    )

    def __call__(self, program: CapturedProgram) -> PassResult:
        layers = program.dims.num_layers
        self.skip.checked(layers, self.name)
        if not self.skip.size:
            return PassResult(program, False)
        anatomy = anatomy_of(program)
        _require_branches(anatomy, self.skip)
        gm = unlift(program)
        _bypass(gm, anatomy, self.skip)
        prune(gm)
        return PassResult(reexport(gm, program), True)


def _require_branches(anatomy: Anatomy, skip: SkipSet) -> None:
    """Every layer to be skipped has its two branches."""
    for layer in anatomy.layers:
        if layer.index in skip.attention | skip.mlp and layer.residual_mid is None:
            raise UnsupportedModelError(
                f"skip_layers: layer {layer.module} has no residual add between its attention "
                "and its MLP (parallel branches), so neither can be bypassed alone")


def _bypass(gm: GraphModule, anatomy: Anatomy, skip: SkipSet) -> None:
    nodes = nodes_by_name(gm)
    presents = layer_presents(gm, len(anatomy.layers))
    # Last layer first: bypassing a branch re-points the users of its add, so a layer's
    # ``residual_in`` must still be the node its inputs come from when it is bypassed.
    for layer in reversed(anatomy.layers):
        mid = nodes[layer.residual_mid]
        if layer.index in skip.mlp:
            nodes[layer.residual_out].replace_all_uses_with(mid)
        if layer.index in skip.attention:
            mid.replace_all_uses_with(nodes[layer.residual_in])
            presents[layer.index] = _scratch_rows(gm, layer)
    outputs = list(gm.graph.output_node().args[0])
    outputs[1] = stack_presents(gm, presents)
    set_outputs(gm, outputs)


def _scratch_rows(gm: GraphModule, layer: LayerAnatomy) -> Node:
    """Zeros shaped like ``layer``'s ``present`` rows ``[2, B, Hkv, N, Dh]``: what a
    bypassed attention sublayer writes (B and N from ``tokens``, like every size)."""
    nodes = nodes_by_name(gm)
    keys = nodes[layer.keys].meta["val"]  # [B, Hkv, T + N, Dh]
    with gm.graph.inserting_before(gm.graph.output_node()):
        batch = gm.graph.call_function(aten.sym_size.int, (nodes["tokens"], 0))
        new = gm.graph.call_function(aten.sym_size.int, (nodes["tokens"], 1))
        return gm.graph.call_function(
            aten.new_zeros.default, (nodes["past"], [2, batch, keys.shape[1], new, keys.shape[3]]))
