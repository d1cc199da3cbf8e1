"""The early-exit helpers: the exit layer's range, the model's head as a graph, and
replacing ``tokens`` by the residual stream."""

from __future__ import annotations

import pytest
import torch
from families import captured, tiny_model
from trees import tree_step_inputs

from leapc.ir.anatomy import anatomy_of
from leapc.ir.early_exit import check_exit_layer, slice_head, take_hidden
from leapc.ir.errors import GraphError, InputError
from leapc.ir.graph import nodes_by_name
from leapc.ir.rewrite import unlift


@pytest.mark.parametrize("exit_layer", [0, 4, -1])
def test_an_exit_must_leave_a_layer_on_each_side(exit_layer):
    with pytest.raises(InputError, match=rf"--exit-layer: exit layer {exit_layer} is out of "
                                         rf"range for a 4-layer model \(1 to 3\)"):
        check_exit_layer(exit_layer, 4, "--exit-layer")
    for inside in (1, 2, 3):
        check_exit_layer(inside, 4, "--exit-layer")


def test_the_head_is_the_models_final_norm_and_lm_head(family):
    """Its only tensor input is ``hidden``: the embedding and the layers are gone."""
    program, model = captured(family), tiny_model(family)
    head = slice_head(program)
    assert [n.name for n in head.graph.nodes if n.op == "placeholder"] == [
        "hidden", "positions", "past", "mask"]
    assert not [n for n in head.graph.nodes if n.target == torch.ops.aten.embedding.default]
    _, positions, past, mask = tree_step_inputs(program.dims, 2, 5, 3)
    hidden = torch.randn(2, 5, program.dims.hidden_size)
    decoder = model.get_decoder()
    norm = decoder.norm if hasattr(decoder, "norm") else decoder.ln_f
    with torch.no_grad():
        (logits,) = head(hidden, positions, past, mask)
        torch.testing.assert_close(logits, model.get_output_embeddings()(norm(hidden)))


def test_taking_hidden_refuses_a_cut_that_ops_after_it_still_read_the_tokens():
    """With ``present`` still an output, the layers before the cut must stay, and they read
    the tokens through the embedding."""
    program = captured("llama")
    gm = unlift(program)
    last = nodes_by_name(gm)[anatomy_of(program).layers[-1].residual_out]
    with pytest.raises(GraphError, match="ops after the cut read the tokens"):
        take_hidden(gm, last)
