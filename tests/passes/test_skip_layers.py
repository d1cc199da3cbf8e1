"""skip_layers in a pipeline: bypassed sublayers equal the model with those branches zeroed
(forward hooks on the HF model), on every family; Before/Expected structure; refusals."""

from __future__ import annotations

import contextlib

import pytest
import torch
from families import FAMILIES, PASS_FAMILIES, captured, family_params, tiny_model
from programs import ATTENTION, MLP, call_counts, decode_inputs, llama_parts, parts, run

from leapc.ir.errors import InputError
from leapc.ir.skip_spec import SkipSet
from leapc.passes.base import violation
from leapc.passes.insert_tree_attention import SDPA
from leapc.passes.pipeline import Pipeline
from leapc.passes.skip_layers import SkipLayers

SETS = ("a1", "m0", "0", "a0,m1")


def _branches(model, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    block = model.get_decoder().layers[layer] if hasattr(model.get_decoder(), "layers") \
        else model.get_decoder().h[layer]
    attention = block.self_attn if hasattr(block, "self_attn") else block.attn
    return attention, block.mlp


@contextlib.contextmanager
def zeroed(model, skip: SkipSet):
    """The HF model with the skipped branches contributing zeros to the residual stream."""
    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handles = []
    for layer in skip.attention:
        handles.append(_branches(model, layer)[0].register_forward_hook(zero))
    for layer in skip.mlp:
        handles.append(_branches(model, layer)[1].register_forward_hook(zero))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _reference(model, skip: SkipSet, prefix, new):
    """The target's own past over ``prefix``; the skipped model's logits and cache rows at
    ``new`` reading that past."""
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        past = torch.stack([torch.stack([c.keys, c.values]) for c in cache.layers])
        with zeroed(model, skip):
            out = model(input_ids=new, past_key_values=cache, use_cache=True)
        rows = [torch.stack([c.keys, c.values])[..., prefix.shape[1]:, :] for c in cache.layers]
        return past, out.logits, rows


@pytest.mark.parametrize("text", SETS)
@pytest.mark.parametrize("family", family_params((*FAMILIES, *PASS_FAMILIES)))
def test_skipped_sublayers_equal_the_model_with_those_branches_zeroed(family, text):
    model, full = tiny_model(family), captured(family)
    skip = SkipSet.parse(text, full.dims.num_layers)
    draft = Pipeline((SkipLayers(skip),))(full).program
    prefix, new, positions, mask = decode_inputs(full.dims.vocab_size)
    past, want_logits, want_rows = _reference(model, skip, prefix, new)
    logits, present = run(draft, new, positions, past, mask)
    torch.testing.assert_close(logits, want_logits)
    for layer in range(full.dims.num_layers):
        if layer in skip.attention:  # scratch: never read, never committed
            assert not present[layer].any()
        else:
            torch.testing.assert_close(present[layer], want_rows[layer])


def test_skipped_sublayers_and_their_weights_are_gone():
    full = captured("llama")
    result = Pipeline((SkipLayers(SkipSet.parse("a1,m0", full.dims.num_layers)),))(full)
    draft = result.program
    assert parts(full) == llama_parts({0: (ATTENTION, MLP), 1: (ATTENTION, MLP)})
    assert parts(draft) == llama_parts({0: (ATTENTION,), 1: (MLP,)})
    assert call_counts(full)[SDPA] == 2 and call_counts(draft)[SDPA] == 1
    weights = set(draft.program.state_dict)
    assert not any(".layers.1.self_attn." in name for name in weights)
    assert not any(".layers.0.mlp." in name for name in weights)
    assert any(".layers.0.self_attn." in name for name in weights)
    assert draft.signature == full.signature and result.modified == ("skip_layers",)
    for invariant in SkipLayers.ensures:
        assert violation(invariant, draft) is None


def test_an_empty_skip_set_leaves_the_program_as_it_is():
    full = captured("llama")
    result = Pipeline((SkipLayers(SkipSet()),))(full)
    assert result.program is full and result.modified == ()


def test_a_skip_set_outside_the_model_is_a_user_error_through_the_pipeline():
    with pytest.raises(InputError, match=r"skip_layers: layer 2 is out of range"):
        Pipeline((SkipLayers(SkipSet(frozenset({2}))),))(captured("llama"))


@pytest.mark.parametrize(("text", "message"), [
    ("a2", "layer 2 is out of range for a 2-layer model (0 to 1)"),
    ("x1", "'x1' is not a layer (7), an attention (a7) or an MLP (m7) sublayer"),
    ("a0,a1", "must keep at least one attention sublayer"),
])
def test_bad_skip_sets_are_user_errors(text, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SkipSet.parse(text, 2)
