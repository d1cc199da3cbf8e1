"""The shared FX graph helpers: traversal, constants, no-op ops, ``present`` surgery, pruning."""

from __future__ import annotations

import pytest
import torch
from families import captured
from trees import tree_step_inputs

from leapc.ir.errors import GraphError
from leapc.ir.graph import (
    ancestors,
    constant_placeholders,
    descendants,
    is_noop,
    layer_presents,
    nodes_by_name,
    prune,
    stack_presents,
)
from leapc.ir.rewrite import reexport, set_outputs, unlift

aten = torch.ops.aten


def test_ancestors_and_descendants_follow_data_edges_only():
    def f(x, y):
        a = x + 1
        return a * y, x - 1

    nodes = nodes_by_name(torch.fx.symbolic_trace(f))
    x, y, add, mul, sub = (nodes[n] for n in ("x", "y", "add", "mul", "sub"))
    assert ancestors(mul) == {x, y, add}
    assert ancestors(sub) == {x}
    assert descendants(x) == {add, mul, sub, nodes["output"]}
    assert descendants(y) == {mul, nodes["output"]}


def test_constant_placeholders_are_the_weights_buffers_and_constants():
    program = captured("llama").program
    sig = program.graph_signature
    names = {n.name for n in constant_placeholders(program)}
    assert names == {*sig.inputs_to_parameters, *sig.inputs_to_buffers,
                     *sig.inputs_to_lifted_tensor_constants}
    assert not names & set(sig.user_inputs)


class _Casts(torch.nn.Module):
    def forward(self, x):
        same = x.to(torch.float32)  # x is float32: an identity cast
        empty_then_x = torch.cat([x.new_zeros(0), x.flatten()])
        return same * 2, x.to(torch.float16), empty_then_x, torch.cat([x, x]), x.detach() * 3


def test_is_noop_finds_identity_casts_empty_concatenations_and_aliases():
    program = torch.export.export(_Casts(), (torch.randn(2, 3),), strict=False)
    found = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target != aten._assert_tensor_metadata.default:
            found.setdefault(node.target, []).append(is_noop(node))
    assert found[aten.to.dtype] == [True, False]  # to float32 (a no-op), then to float16
    assert found[aten.cat.default] == [True, False]  # with an empty operand, then x with x
    assert found[aten.detach.default] == [True]
    assert not any(found[aten.mul.Tensor] + found[aten.flatten.using_ints])


def test_restacking_the_layer_presents_reorders_present():
    """``present`` re-stacked from the layers' rows in reverse holds them in reverse."""
    program = captured("llama")
    gm = unlift(program)
    rows = layer_presents(gm, 2)
    assert [r.meta["val"].shape[0] for r in rows] == [2, 2]  # [2 (K, V), B, Hkv, N, Dh]
    logits, _ = gm.graph.output_node().args[0]
    set_outputs(gm, [logits, stack_presents(gm, rows[::-1])])
    swapped = reexport(gm, program)
    inputs = tree_step_inputs(program.dims, 2, 3, 4)
    with torch.no_grad():
        _, present = program.program.module()(*inputs)
        _, reversed_present = swapped.program.module()(*inputs)
    torch.testing.assert_close(reversed_present, present.flip(0))


def test_layer_presents_refuses_a_present_that_is_not_the_layer_stack():
    gm = unlift(captured("llama"))
    with pytest.raises(GraphError, match="the present output is not a stack of 3 layers"):
        layer_presents(gm, 3)


def test_prune_drops_what_no_output_reads_weights_and_attention_included():
    """Kept: layer 0's present rows. Needed for them: the embedding, layer 0's input norm
    and its key and value projections; the rest (SDPA too) goes."""
    gm = unlift(captured("llama"))
    set_outputs(gm, [layer_presents(gm, 2)[0]])
    prune(gm)
    weights = {name for name, _ in gm.named_parameters()}
    assert weights == {"model.model.embed_tokens.weight",
                       "model.model.layers.0.input_layernorm.weight",
                       "model.model.layers.0.self_attn.k_proj.weight",
                       "model.model.layers.0.self_attn.v_proj.weight"}
    assert not [n for n in gm.graph.nodes
                if n.target == aten.scaled_dot_product_attention.default]
    assert {n.name for n in gm.graph.nodes if n.op == "placeholder"} == {
        "tokens", "positions", "past", "mask"}
