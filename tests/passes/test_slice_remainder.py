"""slice_remainder in a pipeline: Before/Expected structure, the draft then the remainder
equal the full program (random trees, several B, N, T; every family), the contract it
ensures, and what it refuses."""

from __future__ import annotations

import functools

import pytest
import torch
from families import family_params, tiny_model
from programs import (
    ATTENTION,
    DEEP_LAYERS,
    EXIT,
    MLP,
    call_counts,
    decode_inputs,
    deep_model,
    exit_source,
    hf_exit_reference,
    llama_parts,
    parts,
    run,
)
from trees import tree_step_inputs

from leapc.ir import signature as sig
from leapc.ir.errors import InputError
from leapc.passes.base import PassError, violation
from leapc.passes.insert_tree_attention import SDPA, TREE_ATTENTION, InsertTreeAttention
from leapc.passes.pipeline import Pipeline
from leapc.passes.slice_draft import SliceDraft
from leapc.passes.slice_remainder import SliceRemainder

# (B, N, T): one-token decode over one slot, a batch of trees, T + N = max_seq
SHAPES = ((1, 1, 1), (3, 6, 9), (2, 16, 48))


@functools.cache
def remainder(key: str):
    full, exit_layer = exit_source(key)
    return Pipeline((SliceRemainder(exit_layer),))(full)


def test_the_remainder_keeps_the_layers_from_the_exit_and_the_head():
    full = exit_source("deep")[0]
    before = llama_parts({i: (ATTENTION, MLP) for i in range(DEEP_LAYERS)})
    expected = llama_parts({i: (ATTENTION, MLP) for i in range(EXIT, DEEP_LAYERS)},
                           embedding=False)
    assert parts(full) == before
    assert parts(remainder("deep").program) == expected
    assert call_counts(remainder("deep").program)[SDPA] == DEEP_LAYERS - EXIT
    weights = set(remainder("deep").program.program.state_dict)
    assert {int(n.split(".")[3]) for n in weights if ".layers." in n} == {2, 3}
    assert "model.model.embed_tokens.weight" not in weights


def test_the_remainder_signature_reads_hidden_and_l_minus_e_layers():
    full, result = exit_source("deep")[0], remainder("deep")
    r = result.program.signature
    assert result.ran == result.modified == ("slice_remainder",)
    assert result.program.program.graph_signature.user_inputs == (
        "hidden", "positions", "past", "mask")
    assert [s.name for s in r.inputs] == ["hidden", "positions", "past", "mask"]
    assert [s.name for s in r.outputs] == ["logits", "present"]
    for name in ("past", "present"):
        assert r.spec(name).shape == (DEEP_LAYERS - EXIT, *full.signature.spec(name).shape[1:])
    assert r.spec("hidden").shape == (sig.B, sig.N, full.dims.hidden_size)
    assert r.bounds == full.signature.bounds
    for invariant in SliceRemainder.ensures:
        assert violation(invariant, result.program) is None


@pytest.mark.parametrize("key", ["deep", *family_params()])
def test_the_remainder_of_hfs_hidden_state_is_the_models_logits(key):
    model = deep_model() if key == "deep" else tiny_model(key)
    full, e = exit_source(key)
    prefix, new, positions, mask = decode_inputs(full.dims.vocab_size)
    past, _, hidden, want_logits = hf_exit_reference(model, prefix, new, e)
    logits, _ = run(remainder(key).program, hidden, positions, past[e:], mask)
    torch.testing.assert_close(logits, want_logits)


@pytest.mark.parametrize("key", ["deep", *family_params()])
def test_the_draft_then_the_remainder_equal_the_full_program(key):
    """Random trees over random valid past prefixes, at several B, N, T (dynamic shapes)."""
    full, e = exit_source(key)
    draft = Pipeline((SliceDraft(e),))(full).program
    for seed, shape in enumerate(SHAPES):
        tokens, positions, past, mask = tree_step_inputs(full.dims, *shape, seed=seed)
        logits, present = run(full, tokens, positions, past, mask)
        _, draft_present, hidden = run(draft, tokens, positions, past[:e], mask)
        rest_logits, rest_present = run(remainder(key).program, hidden, positions, past[e:],
                                        mask)
        torch.testing.assert_close(rest_logits, logits)
        torch.testing.assert_close(torch.cat([draft_present, rest_present]), present)


def test_slices_of_a_tree_attention_program_keep_its_rewrites_and_numbers():
    full = InsertTreeAttention()(exit_source("deep")[0]).program
    draft, rest = (Pipeline((cut(EXIT),))(full).program for cut in (SliceDraft, SliceRemainder))
    assert call_counts(rest)[TREE_ATTENTION] == DEEP_LAYERS - EXIT and not call_counts(rest)[SDPA]
    tokens, positions, past, mask = tree_step_inputs(full.dims, 2, 6, 9)
    logits, present = run(full, tokens, positions, past, mask)
    _, draft_present, hidden = run(draft, tokens, positions, past[:EXIT], mask)
    rest_logits, rest_present = run(rest, hidden, positions, past[EXIT:], mask)
    torch.testing.assert_close(torch.cat([draft_present, rest_present]), present)
    torch.testing.assert_close(rest_logits, logits)


def test_no_pass_runs_on_a_remainder():
    with pytest.raises(PassError, match=r"'slice_draft' \(after slice_remainder\): required "
                                        r"STEP_CONTRACT violated: user inputs are \['hidden'"):
        Pipeline((SliceRemainder(EXIT), SliceDraft(1)))(exit_source("deep")[0])


@pytest.mark.parametrize("exit_layer", [0, DEEP_LAYERS])
def test_an_exit_layer_outside_the_model_is_a_user_error(exit_layer):
    with pytest.raises(InputError, match=rf"slice_remainder: exit layer {exit_layer} is out "
                                         rf"of range for a 4-layer model \(1 to 3\)"):
        Pipeline((SliceRemainder(exit_layer),))(exit_source("deep")[0])
