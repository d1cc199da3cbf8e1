"""slice_draft in a pipeline: Before/Expected structure, numbers against the HF model on
every family, the contract it ensures, refusals."""

from __future__ import annotations

import functools

import pytest
import torch
from families import FAMILIES, PASS_FAMILIES, family_params, tiny_model
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

from leapc.ir import signature as sig
from leapc.ir.errors import InputError
from leapc.passes.base import violation
from leapc.passes.insert_tree_attention import SDPA, TREE_ATTENTION, InsertTreeAttention
from leapc.passes.pipeline import Pipeline
from leapc.passes.slice_draft import SliceDraft


@functools.cache
def draft(key: str):
    full, exit_layer = exit_source(key)
    return Pipeline((SliceDraft(exit_layer),))(full)


def test_the_draft_keeps_the_embedding_the_layers_before_the_exit_and_the_head():
    full = exit_source("deep")[0]
    before = llama_parts({i: (ATTENTION, MLP) for i in range(DEEP_LAYERS)})
    expected = llama_parts({i: (ATTENTION, MLP) for i in range(EXIT)})
    assert parts(full) == before
    assert parts(draft("deep").program) == expected
    assert call_counts(draft("deep").program)[SDPA] == EXIT
    weights = set(draft("deep").program.program.state_dict)
    assert {int(n.split(".")[3]) for n in weights if ".layers." in n} == set(range(EXIT))
    assert {"model.model.embed_tokens.weight", "model.model.norm.weight",
            "model.lm_head.weight"} <= weights


def test_the_draft_signature_is_the_step_contract_over_e_layers_plus_hidden():
    full, result = exit_source("deep")[0], draft("deep")
    d = result.program.signature
    assert result.ran == result.modified == ("slice_draft",)
    assert [s.name for s in d.inputs] == ["tokens", "positions", "past", "mask"]
    assert [s.name for s in d.outputs] == ["logits", "present", "hidden"]
    for name in ("past", "present"):
        assert d.spec(name).shape == (EXIT, *full.signature.spec(name).shape[1:])
    assert d.spec("hidden").shape == (sig.B, sig.N, full.dims.hidden_size)
    assert d.bounds == full.signature.bounds and result.program.dims.num_layers == EXIT
    # Ensured, so passes can run on the draft.
    for invariant in SliceDraft.ensures:
        assert violation(invariant, result.program) is None


@pytest.mark.parametrize("key", ["deep", *family_params((*FAMILIES, *PASS_FAMILIES))])
def test_the_draft_is_the_models_first_layers_then_its_head(key):
    """Logits: HF's residual stream after E layers through its final norm and head;
    hidden: that residual stream; present: the full program's rows of the first E layers."""
    model = deep_model() if key == "deep" else tiny_model(key)
    full, e = exit_source(key)
    prefix, new, positions, mask = decode_inputs(full.dims.vocab_size)
    past, want_logits, want_hidden, _ = hf_exit_reference(model, prefix, new, e)
    logits, present, hidden = run(draft(key).program, new, positions, past[:e], mask)
    _, full_present = run(full, new, positions, past, mask)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(hidden, want_hidden)
    torch.testing.assert_close(present, full_present[:e])


def test_slicing_keeps_the_pipelines_rewrites():
    full = InsertTreeAttention()(exit_source("deep")[0]).program
    sliced = Pipeline((SliceDraft(EXIT),))(full).program
    assert call_counts(sliced)[TREE_ATTENTION] == EXIT and not call_counts(sliced)[SDPA]


@pytest.mark.parametrize("exit_layer", [0, DEEP_LAYERS])
def test_an_exit_layer_outside_the_model_is_a_user_error_through_the_pipeline(exit_layer):
    with pytest.raises(InputError, match=rf"slice_draft: exit layer {exit_layer} is out of "
                                         rf"range for a 4-layer model \(1 to 3\)"):
        Pipeline((SliceDraft(exit_layer),))(exit_source("deep")[0])
