"""restrict_draft_vocabulary: a draft's head projects onto the chosen tokens only.
Before/Expected structure, numbers against the unrestricted draft, refusals."""

from __future__ import annotations

import functools

import pytest
import torch
from families import family_params, tiny_model
from programs import EXIT, exit_source, run
from test_insert_decoding_heads import random_heads
from test_slice_kangaroo import adapter
from trees import tree_step_inputs

from leapc.ir.errors import InputError
from leapc.ir.head_spec import HeadKind
from leapc.ir.heads import capture_heads
from leapc.passes.base import PassError
from leapc.passes.pipeline import Pipeline
from leapc.passes.restrict_draft_vocabulary import RestrictDraftVocabulary
from leapc.passes.slice_draft import SliceDraft
from leapc.passes.slice_kangaroo import SliceKangaroo

aten = torch.ops.aten
IDS = (0, 3, 4, 9, 17, 30)


@functools.cache
def draft(key: str):
    full, e = exit_source(key)
    return Pipeline((SliceDraft(e),))(full).program


def _vocabulary_projections(program) -> list[tuple[int, ...]]:
    """The shapes of the weights every ``linear`` onto vocabulary-sized rows reads."""
    ep = program.program
    tensors = {**ep.state_dict, **ep.constants}
    names = ep.graph_signature.inputs_to_parameters | ep.graph_signature.inputs_to_buffers
    shapes = [tuple(tensors[names[n.args[1].name]].shape) for n in ep.graph.nodes
              if n.target == aten.linear.default]
    return [s for s in shapes if s[0] in (len(IDS), program.dims.vocab_size)]


def test_the_head_reads_the_chosen_rows_only():
    before = draft("deep")
    after = Pipeline((RestrictDraftVocabulary(IDS),))(before).program
    hidden = before.dims.hidden_size
    assert _vocabulary_projections(before) == [(before.dims.vocab_size, hidden)]
    assert _vocabulary_projections(after) == [(len(IDS), hidden)]
    assert after.signature == before.signature


@pytest.mark.parametrize("key", ["deep", *family_params(("llama", "gemma", "gpt2"))])
def test_chosen_logits_are_the_drafts_and_the_others_minus_infinity(key):
    """Gemma caps its logits after the head: a capped -inf is -cap, still below every
    chosen token's logit, so a greedy draft proposes only chosen tokens."""
    before = draft(key)
    after = Pipeline((RestrictDraftVocabulary(IDS),))(before).program
    tokens, positions, past, mask = tree_step_inputs(before.dims, 2, 5, 7)
    layers = before.signature.spec("past").shape[0]
    want_logits, *want_rest = run(before, tokens, positions, past[:int(layers)], mask)
    logits, *rest = run(after, tokens, positions, past[:int(layers)], mask)
    ids = list(IDS)
    torch.testing.assert_close(logits[..., ids], want_logits[..., ids])
    others = torch.ones(before.dims.vocab_size, dtype=torch.bool)
    others[ids] = False
    assert (logits[..., others] < logits[..., ids].min()).all()
    if key == "deep":
        assert torch.isneginf(logits[..., others]).all()
    for ours, want in zip(rest, want_rest, strict=True):  # KV rows and hidden: untouched
        torch.testing.assert_close(ours, want, rtol=0, atol=0)
    assert (logits.argmax(-1)[..., None] == torch.tensor(ids)).any(-1).all()


def test_a_kangaroo_draft_is_restricted_too():
    full, e = exit_source("deep")
    kangaroo = Pipeline((SliceKangaroo(e, adapter("deep")),
                         RestrictDraftVocabulary(IDS)))(full).program
    assert _vocabulary_projections(kangaroo) == [(len(IDS), full.dims.hidden_size)]
    assert kangaroo.signature.spec("past").shape[0] == EXIT


@pytest.mark.parametrize("ids", [(), (3, 1), (2, 2), (-1, 4), (0, 10_000)])
def test_ids_that_are_not_distinct_sorted_tokens_are_refused(ids):
    with pytest.raises(InputError, match="distinct, sorted and within the model's"):
        Pipeline((RestrictDraftVocabulary(ids),))(draft("deep"))


def test_a_program_without_a_vocabulary_projection_is_an_internal_error():
    twice = Pipeline((RestrictDraftVocabulary(IDS),))(draft("deep")).program
    with pytest.raises(PassError, match="restrict_draft_vocabulary: no vocabulary projection"):
        Pipeline((RestrictDraftVocabulary(IDS),))(twice)


@pytest.mark.parametrize("kind", HeadKind)
def test_a_heads_program_captured_onto_a_vocabulary_drafts_within_it(kind):
    """The heads program is exported on its own shapes (ir/heads.py): it is captured
    restricted, with the same spread logits."""
    model, heads = tiny_model("llama"), random_heads(kind, 64)
    whole = capture_heads(heads, model, max_rows=16, max_seq=256)
    part = capture_heads(heads, model, max_rows=16, max_seq=256, vocabulary=IDS)
    inputs = (torch.randn(5, 64),)
    if kind is HeadKind.HYDRA:
        inputs += (torch.randint(0, 256, (5,)), torch.tensor([1]))
    (want,), (got,) = run(whole, *inputs), run(part, *inputs)
    ids = list(IDS)
    torch.testing.assert_close(got[..., ids], want[..., ids])
    others = torch.ones(got.shape[-1], dtype=torch.bool)
    others[ids] = False
    assert torch.isneginf(got[..., others]).all()
    assert part.signature == whole.signature
