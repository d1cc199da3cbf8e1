"""`unroll_draft_chain`: one program call drafts what k greedy step calls would."""

from __future__ import annotations

import pytest
import torch
from families import captured
from programs import decode_inputs, exit_source, run

from leapc.ir.signature import B, N, T
from leapc.passes.base import PassError
from leapc.passes.pipeline import Pipeline
from leapc.passes.slice_draft import SliceDraft
from leapc.passes.unroll_draft_chain import UnrollDraftChain
from leapc.runtime.step import DRAFTED

aten = torch.ops.aten


def stepwise(program, tokens, positions, past, mask, depth: int, calls: int):
    """The chain as a drafter runs it: one step call per token, argmax fed back."""
    outputs, drafted = [run(program, tokens, positions, past, mask)], []
    seen = mask[:, -1:]
    for i in range(1, calls):
        drafted.append(outputs[-1][0][:, -1:].argmax(-1))
        past = torch.cat([past, outputs[-1][1]], dim=4)
        seen = torch.cat([seen, torch.ones_like(seen[..., :1])], dim=2)
        outputs.append(run(program, drafted[-1], positions[:, -1:] + i, past, seen))
    if len(drafted) < depth:
        drafted.append(outputs[-1][0][:, -1:].argmax(-1))
    return outputs, torch.cat(drafted, dim=1)


def step_inputs(program, new: int):
    dims = program.dims
    _, tokens, positions, mask = decode_inputs(dims.vocab_size, prefix=6, new=new)
    g = torch.Generator().manual_seed(2)
    past = torch.randn(dims.num_layers, 2, 2, dims.num_kv_heads, 6, dims.head_dim, generator=g)
    return tokens, positions, past, mask


@pytest.mark.parametrize("new", [1, 3])
def test_a_draft_models_chain_equals_its_step_calls(new):
    program = captured("llama")
    inputs = step_inputs(program, new)
    chain = Pipeline((UnrollDraftChain(depth=4),))(program).program
    logits, present, drafted = run(chain, *inputs)
    outputs, expected = stepwise(program, *inputs, depth=4, calls=4)
    assert torch.equal(drafted, expected)
    torch.testing.assert_close(logits, torch.cat([o[0] for o in outputs], dim=1))
    torch.testing.assert_close(present, torch.cat([o[1] for o in outputs], dim=4))
    assert logits.shape[1] == new + 3 and drafted.shape == (2, 4)


def test_an_early_exits_chain_feeds_its_last_token_and_keeps_every_hidden_state():
    source, layer = exit_source("deep")
    draft = Pipeline((SliceDraft(layer),))(source).program
    inputs = step_inputs(draft, 1)
    chain = Pipeline((UnrollDraftChain(depth=3, closing_call=True),))(draft).program
    *rows, drafted = run(chain, *inputs)
    outputs, expected = stepwise(draft, *inputs, depth=3, calls=4)
    assert torch.equal(drafted, expected)
    names = [s.name for s in draft.signature.outputs]
    for name, got, k in zip(names, rows, range(len(rows)), strict=True):
        axis = 4 if name == "present" else 1
        torch.testing.assert_close(got, torch.cat([o[k] for o in outputs], dim=axis), msg=name)
        assert got.shape[axis] == 4


def test_the_signature_counts_the_chains_rows_and_lowers_max_seq():
    program = captured("llama")
    chain = Pipeline((UnrollDraftChain(depth=4),))(program).program
    signature = chain.signature
    assert [s.name for s in signature.outputs] == ["logits", "present", DRAFTED]
    assert signature.spec("logits").shape[1] == N + 3
    assert signature.spec("present").shape[4] == N + 3
    assert signature.spec(DRAFTED).shape == (B, 4)
    assert signature.spec("past").shape[4] == T
    assert signature.max_seq == program.signature.max_seq - 3
    assert signature.bounds["T"] == (1, program.signature.max_seq - 4)


def test_depth_zero_is_an_internal_error_naming_the_pass():
    with pytest.raises(PassError, match="unroll_draft_chain: depth must be at least 1"):
        Pipeline((UnrollDraftChain(depth=0),))(captured("llama"))


def test_every_layer_reads_past_by_layer_and_concatenates_the_chains_rows_once():
    """Before: call i's past is ``cat(past, present_0, ...)`` whole, then selected per
    layer. Expected: ``past`` is only selected (``past[l][kv]``), and no ``cat`` reads
    another ``cat``'s output on its own axis."""
    chain = Pipeline((UnrollDraftChain(depth=4),))(captured("llama")).program
    graph = chain.program.graph
    past = next(n for n in graph.nodes if n.name == "past")
    assert {u.target for u in past.users} <= {aten.select.int, aten.sym_size.int}
    for node in graph.find_nodes(op="call_function", target=aten.cat.default):
        dim = node.args[1] % node.meta["val"].dim()
        for part in node.args[0]:
            assert not (part.target == aten.cat.default and len(part.users) == 1
                        and part.args[1] % part.meta["val"].dim() == dim), node.format_node()


def test_the_chains_present_is_stacked_by_layer_with_each_layers_rows_joined_once():
    """Before: ``cat([stack_l(stack_kv(k, v)) per call], T)``. Expected:
    ``stack_l(stack_kv(cat(call 0's k, ..., call 3's k)))``: the step's per-layer form,
    which the ONNX lowering returns one layer at a time."""
    program = captured("llama")
    chain = Pipeline((UnrollDraftChain(depth=4),))(program).program
    graph = chain.program.graph
    output = next(iter(graph.find_nodes(op="output")))
    present = output.args[0][[s.name for s in chain.signature.outputs].index("present")]
    assert present.target == aten.stack.default
    layers = present.args[0]
    assert len(layers) == program.dims.num_layers
    for layer in layers:
        assert layer.target == aten.stack.default and len(layer.args[0]) == 2
        for rows in layer.args[0]:
            assert rows.target == aten.cat.default and len(rows.args[0]) == 4
