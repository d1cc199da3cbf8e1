"""insert_early_exit and the draft / remainder slices: structure, numbers against the HF
model and the full program, dynamic shapes, refusals."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
import transformers
from families import captured, family_params, tiny_config, tiny_model
from trees import tree_step_inputs

from leapc.ir import signature as sig
from leapc.ir.adapter import KangarooAdapter
from leapc.ir.capture import CaptureOptions, StepModule, capture
from leapc.ir.errors import InputError
from leapc.passes.base import Invariant, PassError, violation
from leapc.passes.insert_early_exit import EXIT_OUTPUT, InsertEarlyExit
from leapc.passes.insert_tree_attention import SDPA, TREE_ATTENTION, InsertTreeAttention
from leapc.passes.pipeline import Pipeline, check_numerics
from leapc.passes.slice_early_exit import slice_draft, slice_kangaroo, slice_remainder

LAYERS, EXIT = 4, 2
# (B, N, T): one-token decode over one slot, a batch of trees, T + N = max_seq
SHAPES = ((1, 1, 1), (3, 6, 9), (2, 16, 48))


@functools.cache
def deep_model() -> transformers.PreTrainedModel:
    """The tiny Llama with 4 layers, so the exit has layers on both sides."""
    config = tiny_config("llama")
    config.num_hidden_layers = LAYERS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@functools.cache
def source(key: str):
    """``"deep"`` (4 layers, exit 2) or a family's 2-layer program (exit 1)."""
    if key == "deep":
        return capture(deep_model(), CaptureOptions(max_seq=64, max_batch=4, max_new=16)), EXIT
    return captured(key), 1


@functools.cache
def programs(key: str):
    """(full, full with exit, draft, remainder)."""
    full, exit_layer = source(key)
    with_exit = InsertEarlyExit(exit_layer)(full).program
    return full, with_exit, slice_draft(full, exit_layer), slice_remainder(full, exit_layer)


def run(program, *inputs):
    with torch.no_grad():
        return program.program.module()(*inputs)


def call_counts(program) -> Counter:
    return Counter(n.target for n in program.program.graph.nodes if n.op == "call_function")


def test_exit_logits_is_a_new_output_sharing_the_head():
    full, with_exit, _, _ = programs("deep")
    dims = full.dims
    assert [s.name for s in with_exit.signature.outputs] == ["logits", "present", EXIT_OUTPUT]
    assert with_exit.signature.spec(EXIT_OUTPUT).shape == with_exit.signature.spec("logits").shape
    assert with_exit.signature.inputs == full.signature.inputs
    assert with_exit.program.state_dict.keys() == full.program.state_dict.keys()
    assert call_counts(with_exit)[SDPA] == LAYERS
    for invariant in InsertEarlyExit.ensures:
        assert violation(invariant, with_exit) is None
    logits, present, exit_logits = run(with_exit, *tree_step_inputs(dims, 2, 5, 7))
    assert exit_logits.shape == logits.shape == (2, 5, dims.vocab_size)


def _hf_exit_reference(model, prefix: torch.Tensor, new: torch.Tensor, exit_layer: int):
    """Past from HF over ``prefix``, and the logits of HF's residual stream after
    ``exit_layer`` layers at the ``new`` tokens, through the model's final norm and head."""
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        past = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
        out = model(input_ids=torch.cat([prefix, new], dim=1), output_hidden_states=True)
        decoder = model.get_decoder()
        norm = decoder.norm if hasattr(decoder, "norm") else decoder.ln_f
        hidden = out.hidden_states[exit_layer][:, prefix.shape[1]:]
        return past, model.get_output_embeddings()(norm(hidden)), out.logits[:, prefix.shape[1]:]


@pytest.mark.parametrize("key", ["deep", *family_params()])
def test_exit_logits_equal_the_models_first_layers_then_its_head(key):
    model = deep_model() if key == "deep" else tiny_model(key)
    full, exit_layer = source(key)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, full.dims.vocab_size, (2, 6), generator=g)
    new = torch.randint(3, full.dims.vocab_size, (2, 4), generator=g)
    past, want_exit, want_logits = _hf_exit_reference(model, prefix, new, exit_layer)
    positions = torch.arange(6, 10).expand(2, 4).contiguous()
    mask = torch.cat([torch.ones(4, 6, dtype=torch.bool),
                      torch.ones(4, 4, dtype=torch.bool).tril()], dim=1).expand(2, 4, 10)
    logits, _, exit_logits = run(programs(key)[1], new, positions, past, mask.contiguous())
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(exit_logits, want_exit)


def test_draft_and_remainder_keep_only_their_layers():
    """Ops and weights: the draft has layers < E, the embedding and the head; the
    remainder layers >= E and the head."""
    _, _, draft, remainder = programs("deep")
    assert call_counts(draft)[SDPA] == EXIT
    assert call_counts(remainder)[SDPA] == LAYERS - EXIT
    assert call_counts(remainder)[torch.ops.aten.embedding.default] == 0
    weights = {key: set(p.program.state_dict) for key, p in (("draft", draft),
                                                             ("remainder", remainder))}
    layers = {key: {int(name.split(".")[3]) for name in names if ".layers." in name}
              for key, names in weights.items()}
    assert layers == {"draft": {0, 1}, "remainder": {2, 3}}
    head = {"model.model.norm.weight", "model.lm_head.weight"}
    assert head <= weights["draft"] and head <= weights["remainder"]
    assert "model.model.embed_tokens.weight" in weights["draft"] - weights["remainder"]


def test_draft_and_remainder_signatures():
    full, _, draft, remainder = programs("deep")
    assert draft.program.graph_signature.user_inputs == ("tokens", "positions", "past", "mask")
    assert remainder.program.graph_signature.user_inputs == ("hidden", "positions", "past", "mask")
    assert (draft.dims.num_layers, remainder.dims.num_layers) == (EXIT, LAYERS - EXIT)
    d, r = draft.signature, remainder.signature
    assert [s.name for s in d.inputs] == ["tokens", "positions", "past", "mask"]
    assert [s.name for s in d.outputs] == ["logits", "present", "hidden"]
    assert [s.name for s in r.inputs] == ["hidden", "positions", "past", "mask"]
    assert [s.name for s in r.outputs] == ["logits", "present"]
    assert d.spec("past").shape[0] == d.spec("present").shape[0] == EXIT
    assert r.spec("past").shape[0] == r.spec("present").shape[0] == LAYERS - EXIT
    kv = full.signature.spec("past").shape[1:]
    assert d.spec("past").shape[1:] == r.spec("past").shape[1:] == kv
    assert d.spec("hidden").shape == r.spec("hidden").shape == (sig.B, sig.N, 64)
    assert d.bounds == r.bounds == full.signature.bounds
    # The draft still follows the step contract (plus an output), so passes run on it.
    for invariant in (Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY):
        assert violation(invariant, draft) is None


@pytest.mark.parametrize("key", ["deep", *family_params()])
def test_draft_then_remainder_equals_the_full_program(key):
    """Random trees over random valid past prefixes, at several B, N, T (dynamic shapes)."""
    full, with_exit, draft, remainder = programs(key)
    e = source(key)[1]
    for seed, shape in enumerate(SHAPES):
        tokens, positions, past, mask = tree_step_inputs(full.dims, *shape, seed=seed)
        logits, present, exit_logits = run(with_exit, tokens, positions, past, mask)
        draft_logits, draft_present, hidden = run(draft, tokens, positions, past[:e], mask)
        rest_logits, rest_present = run(remainder, hidden, positions, past[e:], mask)
        torch.testing.assert_close(draft_logits, exit_logits)
        torch.testing.assert_close(draft_present, present[:e])
        torch.testing.assert_close(rest_logits, logits)
        torch.testing.assert_close(rest_present, present[e:])
        assert hidden.shape == (*shape[:2], full.dims.hidden_size)


def test_slices_of_a_tree_attention_program():
    """Slicing comes after the pipeline: the slices keep its rewrites and its numbers."""
    full = InsertTreeAttention()(source("deep")[0]).program
    draft, remainder = slice_draft(full, EXIT), slice_remainder(full, EXIT)
    assert (call_counts(draft)[TREE_ATTENTION], call_counts(remainder)[TREE_ATTENTION]) == (2, 2)
    tokens, positions, past, mask = tree_step_inputs(full.dims, 2, 6, 9)
    logits, present = run(full, tokens, positions, past, mask)
    _, draft_present, hidden = run(draft, tokens, positions, past[:EXIT], mask)
    rest_logits, rest_present = run(remainder, hidden, positions, past[EXIT:], mask)
    torch.testing.assert_close(torch.cat([draft_present, rest_present]), present)
    torch.testing.assert_close(rest_logits, logits)


def test_the_pass_runs_in_a_pipeline():
    """Contract checks around the pass, and the original outputs still match."""
    full = source("deep")[0]
    result = Pipeline((InsertEarlyExit(EXIT),))(full)
    assert result.modified == ("insert_early_exit",)
    check_numerics(StepModule(deep_model()), result.program)


@pytest.mark.parametrize("exit_layer", [0, -1])
def test_a_non_positive_exit_layer_is_refused_at_construction(exit_layer):
    with pytest.raises(InputError, match="insert_early_exit: exit layer must be a positive"):
        InsertEarlyExit(exit_layer)


@pytest.mark.parametrize("cut", [InsertEarlyExit, slice_draft, slice_remainder])
def test_an_exit_layer_past_the_model_is_refused(cut):
    full = source("deep")[0]
    call = cut(LAYERS) if cut is InsertEarlyExit else functools.partial(cut, exit_layer=LAYERS)
    with pytest.raises(InputError, match=r"exit layer 4 is out of range for a 4-layer model "
                                         r"\(1 to 3\)"):
        call(full)


def test_slices_refuse_exit_layer_zero():
    with pytest.raises(InputError, match="slice_remainder: exit layer 0 is out of range"):
        slice_remainder(source("deep")[0], 0)


def test_a_second_exit_is_refused():
    with pytest.raises(PassError, match="insert_early_exit: the program already has"):
        InsertEarlyExit(1)(programs("deep")[1])


def _adapter(key: str) -> KangarooAdapter:
    from leapc.models.train_adapter import adapter_config

    torch.manual_seed(0)
    adapter = KangarooAdapter(adapter_config(deep_model() if key == "deep" else tiny_model(key)))
    torch.nn.init.normal_(adapter.o_proj.weight, std=0.2)  # trained: not the identity
    return adapter.eval()


@functools.cache
def kangaroo(key: str):
    full, exit_layer = source(key)
    return slice_kangaroo(full, exit_layer, _adapter(key))


def test_kangaroo_draft_signature_and_weights():
    full, _, draft, _ = programs("deep")
    program = kangaroo("deep")
    s = program.signature
    assert program.program.graph_signature.user_inputs == (
        "tokens", "positions", "past", "adapter_past", "mask")
    assert [o.name for o in s.outputs] == ["logits", "present", "hidden", "adapter_present"]
    assert s.spec("adapter_past").shape == (1, *full.signature.spec("past").shape[1:])
    assert s.spec("adapter_present").shape == (1, *full.signature.spec("present").shape[1:])
    assert s.spec("past").shape[0] == EXIT and s.bounds == full.signature.bounds
    assert call_counts(program)[SDPA] == EXIT  # the adapter's attention is its own ops
    weights = set(program.program.state_dict)
    assert {n for n in weights if n.startswith("adapter.")} == {
        f"adapter.{name}" for name in _adapter("deep").state_dict()}
    # The model's weights, once each: layers < E and the embedding, then the head.
    model = [n.split(".", 1) for n in weights if not n.startswith("adapter.")]
    assert sorted(name for _, name in model) == sorted(draft.program.state_dict)


@pytest.mark.parametrize("key", ["deep", *family_params(("llama", "gemma", "gpt2"))])
def test_kangaroo_draft_is_the_exit_then_the_adapter_then_the_head(key):
    """``present`` and ``hidden`` are the plain draft's; ``logits`` the model's final norm
    and head (HF's modules) over the adapter's output; ``adapter_present`` its KV rows."""
    model = deep_model() if key == "deep" else tiny_model(key)
    full, _, draft, _ = programs(key)
    e = source(key)[1]
    adapter = _adapter(key)
    tokens, positions, past, mask = tree_step_inputs(full.dims, 2, 5, 7)
    adapter_past = torch.randn(1, *past.shape[1:])
    logits, present, hidden, adapter_present = run(kangaroo(key), tokens, positions, past[:e],
                                                   adapter_past, mask)
    _, want_present, want_hidden = run(draft, tokens, positions, past[:e], mask)
    torch.testing.assert_close(present, want_present)
    torch.testing.assert_close(hidden, want_hidden)
    with torch.no_grad():
        adapted, want_rows = adapter(hidden, positions, adapter_past, mask)
        decoder = model.get_decoder()
        norm = decoder.norm if hasattr(decoder, "norm") else decoder.ln_f
        want = model.lm_head(norm(adapted))
    torch.testing.assert_close(adapter_present, want_rows)
    torch.testing.assert_close(logits, want)
