"""slice_kangaroo in a pipeline: the plain draft's layers, then the adapter, then the
model's head; signature, weights, numbers against the HF modules."""

from __future__ import annotations

import functools

import pytest
import torch
from families import family_params, tiny_model
from programs import EXIT, call_counts, deep_model, exit_source, run
from trees import tree_step_inputs

from leapc.ir.adapter import KangarooAdapter
from leapc.models.train_adapter import adapter_config
from leapc.passes.base import violation
from leapc.passes.insert_tree_attention import SDPA, TREE_ATTENTION, InsertTreeAttention
from leapc.passes.pipeline import Pipeline
from leapc.passes.slice_draft import SliceDraft
from leapc.passes.slice_kangaroo import SliceKangaroo


def _model(key: str):
    return deep_model() if key == "deep" else tiny_model(key)


@functools.cache
def adapter(key: str) -> KangarooAdapter:
    torch.manual_seed(0)
    trained = KangarooAdapter(adapter_config(_model(key)))
    torch.nn.init.normal_(trained.o_proj.weight, std=0.2)  # trained: not the identity
    return trained.eval()


@functools.cache
def programs(key: str):
    """(the Kangaroo pipeline's result, the plain draft)."""
    full, e = exit_source(key)
    kangaroo = Pipeline((SliceKangaroo(e, adapter(key)),))(full)
    return kangaroo, Pipeline((SliceDraft(e),))(full).program


def test_the_kangaroo_draft_signature_and_weights():
    full = exit_source("deep")[0]
    result, draft = programs("deep")
    program, s = result.program, result.program.signature
    assert result.ran == ("slice_kangaroo",)
    assert program.program.graph_signature.user_inputs == (
        "tokens", "positions", "past", "adapter_past", "mask")
    assert [o.name for o in s.outputs] == ["logits", "present", "hidden", "adapter_present"]
    for name in ("past", "present"):
        kv = full.signature.spec(name).shape[1:]
        assert s.spec(f"adapter_{name}").shape == (1, *kv)
        assert s.spec(name).shape == (EXIT, *kv)
    assert s.bounds == full.signature.bounds
    for invariant in SliceKangaroo.ensures:
        assert violation(invariant, program) is None
    assert call_counts(program)[SDPA] == EXIT  # the adapter's attention is its own ops
    weights = set(program.program.state_dict)
    assert {n for n in weights if n.startswith("adapter.")} == {
        f"adapter.{name}" for name in adapter("deep").state_dict()}
    # The model's weights, once each: layers < E and the embedding, then the head.
    model = [n.split(".", 1) for n in weights if not n.startswith("adapter.")]
    assert sorted(name for _, name in model) == sorted(draft.program.state_dict)


@pytest.mark.parametrize("key", ["deep", *family_params(("llama", "gemma", "gpt2"))])
def test_the_kangaroo_draft_is_the_exit_then_the_adapter_then_the_head(key):
    """``present`` and ``hidden`` are the plain draft's; ``logits`` the model's final norm
    and head (HF's modules) over the adapter's output; ``adapter_present`` its KV rows."""
    model = _model(key)
    full, e = exit_source(key)
    result, draft = programs(key)
    tokens, positions, past, mask = tree_step_inputs(full.dims, 2, 5, 7)
    adapter_past = torch.randn(1, *past.shape[1:])
    logits, present, hidden, adapter_present = run(result.program, tokens, positions,
                                                   past[:e], adapter_past, mask)
    _, want_present, want_hidden = run(draft, tokens, positions, past[:e], mask)
    torch.testing.assert_close(present, want_present)
    torch.testing.assert_close(hidden, want_hidden)
    with torch.no_grad():
        adapted, want_rows = adapter(key)(hidden, positions, adapter_past, mask)
        decoder = model.get_decoder()
        norm = decoder.norm if hasattr(decoder, "norm") else decoder.ln_f
        want = model.lm_head(norm(adapted))
    torch.testing.assert_close(adapter_present, want_rows)
    torch.testing.assert_close(logits, want)


def test_on_a_tree_attention_program_the_adapter_attends_with_the_same_op():
    """After `insert_tree_attention`, the adapter's attention is `leapc.tree_attention` too
    (so a lowering fuses it as it fuses the layers'), and every output is the dense
    adapter's on the runtime's prefix-valid masks."""
    full, e = exit_source("deep")
    lowered = Pipeline((InsertTreeAttention(),))(full).program
    tree = Pipeline((SliceKangaroo(e, adapter("deep")),))(lowered).program
    counts = call_counts(tree)
    assert (counts[TREE_ATTENTION], counts[SDPA]) == (EXIT + 1, 0)
    dense = programs("deep")[0].program
    inputs = tree_step_inputs(full.dims, 2, 5, 7)
    tokens, positions, past, mask = inputs
    adapter_past = torch.randn(1, *past.shape[1:])
    for ours, want in zip(run(tree, tokens, positions, past[:e], adapter_past, mask),
                          run(dense, tokens, positions, past[:e], adapter_past, mask),
                          strict=True):
        torch.testing.assert_close(ours, want)
