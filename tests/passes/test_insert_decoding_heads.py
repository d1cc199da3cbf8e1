"""insert_decoding_heads: new outputs and their specs, numbers against the source model's
own hidden states and LM head, the placements, and the separate ``heads`` program."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from families import FAMILIES, PASS_FAMILIES, captured, family_params, tiny_model

from leapc.ir.capture import StepModule, example_inputs
from leapc.ir.errors import InputError
from leapc.ir.head_spec import HeadKind, HeadPlacement, HeadsConfig
from leapc.ir.heads import DecodingHeads, capture_heads, project
from leapc.passes.insert_decoding_heads import InsertDecodingHeads
from leapc.passes.pipeline import check_numerics
from leapc.runtime.backends import ort
from leapc.runtime.manifest import Attention

K = 3


def random_heads(kind: HeadKind, hidden: int, blocks: int = 2, seed: int = 0) -> DecodingHeads:
    heads = DecodingHeads(HeadsConfig(kind, K, blocks), hidden)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return heads


@functools.cache
def with_heads(family: str, placement: HeadPlacement, zero: bool = False):
    hidden = captured(family).dims.hidden_size
    heads = (DecodingHeads(HeadsConfig(HeadKind.MEDUSA, K), hidden) if zero
             else random_heads(HeadKind.MEDUSA, hidden))
    result = InsertDecodingHeads(heads, placement)(captured(family))
    assert result.modified
    return heads, result.program


def final_hidden(family: str, inputs) -> torch.Tensor:
    """The source model's last hidden state (after its final norm) for step inputs."""
    model = tiny_model(family)
    step = StepModule(model)
    captured_hidden = {}
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: captured_hidden.setdefault("h", args[0]))
    with torch.no_grad():
        step(*inputs)
    hook.remove()
    return captured_hidden["h"]


@pytest.mark.parametrize("family", family_params((*FAMILIES, *PASS_FAMILIES)))
def test_zero_initialised_heads_reproduce_the_lm_head(family):
    _, program = with_heads(family, HeadPlacement.STEP, zero=True)
    inputs = example_inputs(program.dims)
    logits, _, head_logits = program.program.module()(*inputs)
    assert head_logits.shape == (K, *logits.shape)
    for k in range(K):
        torch.testing.assert_close(head_logits[k], logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", family_params((*FAMILIES, *PASS_FAMILIES)))
def test_step_heads_equal_the_heads_on_the_source_models_hidden_state(family):
    heads, program = with_heads(family, HeadPlacement.STEP)
    inputs = example_inputs(program.dims)
    *_, head_logits = program.program.module()(*inputs)
    hidden = final_hidden(family, inputs)
    lm = tiny_model(family).get_output_embeddings()
    with torch.no_grad():
        rows = hidden.reshape(-1, hidden.shape[-1])
        expected = project(heads.states(rows), lm.weight, lm.bias).reshape(head_logits.shape)
    torch.testing.assert_close(head_logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(head_logits[0], head_logits[1])  # the heads differ


@pytest.mark.parametrize("family", family_params(("llama", "gpt2")))
def test_program_placement_exposes_the_hidden_state_the_lm_head_reads(family):
    _, program = with_heads(family, HeadPlacement.PROGRAM)
    names = [s.name for s in program.signature.outputs]
    assert names == ["logits", "present", "hidden"]
    assert [str(d) for d in program.signature.spec("hidden").shape] == [
        "B", "N", str(program.dims.hidden_size)]
    inputs = example_inputs(program.dims)
    logits, _, hidden = program.program.module()(*inputs)
    torch.testing.assert_close(hidden, final_hidden(family, inputs))
    lm = tiny_model(family).get_output_embeddings()
    torch.testing.assert_close(torch.nn.functional.linear(hidden, lm.weight, lm.bias), logits,
                               rtol=1e-5, atol=1e-5)


def test_original_outputs_still_match_the_source_model():
    _, program = with_heads("qwen2", HeadPlacement.STEP)
    check_numerics(StepModule(tiny_model("qwen2")), program)
    spec = program.signature.spec("head_logits")
    assert [str(d) for d in spec.shape] == [str(K), "B", "N", "256"]


def test_dynamic_shapes_survive_the_rewrite():
    _, program = with_heads("llama", HeadPlacement.STEP)
    module = program.program.module()
    for batch, new, past in ((1, 1, 1), (3, 7, 20)):
        *_, head_logits = module(*example_inputs(program.dims, batch, new, past))
        assert head_logits.shape == (K, batch, new, 256)


def test_hydra_heads_cannot_run_inside_the_step_program():
    heads = DecodingHeads(HeadsConfig(HeadKind.HYDRA, K), 64)
    with pytest.raises(InputError, match="Hydra heads read the drafted tokens"):
        InsertDecodingHeads(heads, HeadPlacement.STEP)


@pytest.mark.parametrize("kind", HeadKind)
def test_heads_program_in_onnx_runtime_equals_the_heads(kind, tmp_path):
    model = tiny_model("llama")
    heads = random_heads(kind, 64)
    program = capture_heads(heads, model, max_rows=16, max_seq=256)
    step = ort.OrtStep(ort.lower(program, tmp_path, "heads", Attention.TREE))
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((5, 64)).astype(np.float32)
    lm = model.get_output_embeddings()
    h = torch.from_numpy(hidden)
    with torch.no_grad():
        if kind is HeadKind.HYDRA:
            tokens = rng.integers(0, 256, 5)
            got = step(hidden, tokens, np.asarray([2]))["head_logits"]
            embedded = model.get_input_embeddings().weight[torch.from_numpy(tokens)]
            states = heads.states(h, embedded.expand(K, -1, -1))
            expected = project(states[2:3], lm.weight)
        else:
            got = step(hidden)["head_logits"]
            expected = project(heads.states(h), lm.weight)
    assert got.shape == tuple(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
