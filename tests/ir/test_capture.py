"""The captured step program equals the Hugging Face model run the standard way."""

from __future__ import annotations

import pytest
import torch
from families import UNSUPPORTED, captured, tiny_checkpoint, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache

from leapc.ir import signature as sig
from leapc.ir.capture import CaptureOptions, MaskLayout, StepModule, capture
from leapc.ir.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def model(family):
    return tiny_model(family)


@pytest.fixture(scope="module")
def step(family):
    """The captured program of ``family`` and a callable running it."""
    cap = captured(family)
    module = cap.program.module()

    def run(tokens, positions, past, mask):
        with torch.no_grad():
            return module(tokens, positions, past, mask)

    return cap, run


def _prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


def _chain_mask(batch: int, new: int, past_valid: torch.Tensor | int, past_slots: int):
    """``[B, N, T + N]``: the first ``past_valid`` slots (per row) plus causal new tokens."""
    valid = torch.as_tensor(past_valid).expand(batch)
    past = torch.arange(past_slots)[None, :] < valid[:, None]
    causal = torch.ones(new, new, dtype=torch.bool).tril()
    return torch.cat([past[:, None, :].expand(batch, new, past_slots),
                      causal.expand(batch, new, new)], dim=-1)


def _positions(batch: int, start: int, new: int) -> torch.Tensor:
    return (start + torch.arange(new)).expand(batch, new).contiguous()


def _garbage_past(dims, batch: int, slots: int) -> torch.Tensor:
    """Past slots marked invalid in the mask: large random values that must not leak."""
    g = torch.Generator().manual_seed(7)
    return 100 * torch.randn(dims.num_layers, 2, batch, dims.num_kv_heads, slots, dims.head_dim,
                             generator=g)


def _inputs(dims, batch: int, new: int, past: int):
    return (_prompts(batch, new), _positions(batch, past, new), _garbage_past(dims, batch, past),
            _chain_mask(batch, new, past, past))


def _hf_cache_kv(cache: DynamicCache, start: int, stop: int) -> torch.Tensor:
    """``[L, 2, B, Hkv, stop - start, Dh]`` rows of a transformers cache."""
    return torch.stack([torch.stack([lyr.keys[..., start:stop, :], lyr.values[..., start:stop, :]])
                        for lyr in cache.layers])


def _check_prefill_then_chunk(model, run, dims):
    """Prompt of 7: prefill 4 (against one invalid dummy slot), then a chunk of 3."""
    prompt = _prompts(2, 7)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        hf_prefill = model(input_ids=prompt[:, :4], past_key_values=cache, use_cache=True).logits
        hf_chunk = model(input_ids=prompt[:, 4:], past_key_values=cache, use_cache=True).logits

    # The step program needs T >= 1: the runtime passes a dummy slot and masks it out.
    dummy = _garbage_past(dims, 2, 1)
    logits, present = run(prompt[:, :4], _positions(2, 0, 4), dummy, _chain_mask(2, 4, 0, 1))
    torch.testing.assert_close(logits, hf_prefill)
    torch.testing.assert_close(present, _hf_cache_kv(cache, 0, 4))

    logits, present2 = run(prompt[:, 4:], _positions(2, 4, 3), present, _chain_mask(2, 3, 4, 4))
    torch.testing.assert_close(logits, hf_chunk)
    torch.testing.assert_close(present2, _hf_cache_kv(cache, 4, 7))
    assert present2.shape == (dims.num_layers, 2, 2, dims.num_kv_heads, 3, dims.head_dim)


def test_prefill_then_chunk_matches_hf(model, step):
    cap, run = step
    _check_prefill_then_chunk(model, run, cap.dims)


@pytest.mark.parametrize("batch", [1, 3])
def test_single_token_decode_matches_hf(model, step, batch):
    """N = 1 with B = 1 and B = 3 (dynamic dims), against HF's own decode step."""
    cap, run = step
    prompt = _prompts(batch, 6, seed=batch)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt[:, :5], past_key_values=cache, use_cache=True)
        hf = model(input_ids=prompt[:, 5:], past_key_values=cache, use_cache=True).logits
    past = _hf_cache_kv(cache, 0, 5)
    logits, present = run(prompt[:, 5:], _positions(batch, 5, 1), past, _chain_mask(batch, 1, 5, 5))
    assert logits.shape == (batch, 1, cap.dims.vocab_size)
    torch.testing.assert_close(logits, hf)
    torch.testing.assert_close(present, _hf_cache_kv(cache, 5, 6))


def test_ragged_batch_rows_are_independent(step):
    """Rows with different numbers of valid past slots equal each row run alone."""
    cap, run = step
    prompt = _prompts(3, 6, seed=5)
    valid = torch.tensor([5, 3, 1])
    slots = 5
    past = _garbage_past(cap.dims, 3, slots)
    for row, n in enumerate(valid.tolist()):  # fill each row's valid slots with its prefix
        _, kv = run(prompt[row:row + 1, :n], _positions(1, 0, n), _garbage_past(cap.dims, 1, 1),
                    _chain_mask(1, n, 0, 1))
        past[:, :, row, :, :n] = kv[:, :, 0]
    positions = valid[:, None] + torch.arange(1)
    tokens = prompt[:, 5:]
    logits, present = run(tokens, positions, past, _chain_mask(3, 1, valid, slots))
    for row, n in enumerate(valid.tolist()):
        alone, kv = run(tokens[row:row + 1], positions[row:row + 1], past[:, :, row:row + 1, :, :n],
                        _chain_mask(1, 1, n, n))
        torch.testing.assert_close(logits[row:row + 1], alone)
        torch.testing.assert_close(present[:, :, row:row + 1], kv)


def test_tree_mask_equals_chains_of_ancestors(step):
    """Nodes 2 and 3 are both children of node 1: each node sees only its ancestors."""
    cap, run = step
    prompt = _prompts(1, 3, seed=3)
    _, past = run(prompt, _positions(1, 0, 3), _garbage_past(cap.dims, 1, 1),
                  _chain_mask(1, 3, 0, 1))
    tree = _prompts(1, 4, seed=4)
    parents = [-1, 0, 1, 1]
    ancestors = []
    for node, parent in enumerate(parents):
        ancestors.append([*(ancestors[parent] if parent >= 0 else []), node])
    depth = torch.tensor([len(a) - 1 for a in ancestors])
    tree_mask = torch.zeros(4, 4, dtype=torch.bool)
    for node, chain in enumerate(ancestors):
        tree_mask[node, chain] = True
    mask = torch.cat([torch.ones(4, 3, dtype=torch.bool), tree_mask], dim=-1)[None]
    logits, present = run(tree, (3 + depth)[None], past, mask)
    for node, chain in enumerate(ancestors):
        n = len(chain)
        alone, kv = run(tree[:, chain], _positions(1, 3, n), past, _chain_mask(1, n, 3, 3))
        torch.testing.assert_close(logits[:, node], alone[:, -1])
        torch.testing.assert_close(present[..., node, :], kv[..., -1, :])


def test_signature_and_export_bounds(step):
    cap, _ = step
    s = cap.signature
    assert s.bounds == {"B": (1, 4), "N": (1, 16), "T": (1, 63)}
    assert s.max_seq == 64
    assert [t.name for t in s.inputs] == ["tokens", "positions", "past", "mask"]
    assert [t.name for t in s.outputs] == ["logits", "present"]
    assert s.spec("mask").shape == (sig.B, sig.N, sig.T + sig.N)
    assert s.spec("mask").dtype == "bool"
    d = cap.dims
    assert s.spec("past").shape == (d.num_layers, 2, sig.B, d.num_kv_heads, sig.T, d.head_dim)
    assert s.spec("present").shape == (d.num_layers, 2, sig.B, d.num_kv_heads, sig.N,
                                       d.head_dim)
    assert s.spec("logits").shape == (sig.B, sig.N, d.vocab_size)
    assert sig.StepSignature.from_json(s.to_json()) == s
    # The exported program itself carries the same bounds on its symbolic dims.
    placeholders = {n.name: n.meta["val"] for n in cap.program.graph.nodes
                    if n.op == "placeholder"}
    b, n = placeholders["tokens"].shape
    t = placeholders["past"].shape[4]
    assert placeholders["mask"].shape[2] == t + n  # derived, not a fresh symbol
    ranges = {str(k): (int(v.lower), int(v.upper)) for k, v in cap.program.range_constraints.items()}
    assert ranges[str(b)] == (1, 4)
    assert ranges[str(n)] == (1, 16)
    assert ranges[str(t)] == (1, 63)
    assert ranges[str(t + n)] == (2, 64)  # T = N = 1 allowed; T + N capped at max_seq


def test_extreme_dims_run_and_overlong_calls_are_refused(step):
    cap, run = step
    for b, n, t in [(1, 1, 1), (4, 16, 48), (1, 1, 63)]:
        logits, present = run(*_inputs(cap.dims, b, n, t))
        assert logits.shape == (b, n, cap.dims.vocab_size)
        assert present.shape[2] == b and present.shape[4] == n
    with pytest.raises(Exception, match="mask"):  # T + N = 65 > max_seq
        run(*_inputs(cap.dims, 1, 2, 63))


def test_dims_match_config(family, step):
    cap, _ = step
    d = cap.dims
    assert (d.num_layers, d.hidden_size, d.vocab_size, d.dtype) == (2, 64, 256, "float32")
    assert d.num_kv_heads == (4 if family == "gpt2" else 2)  # GQA everywhere but GPT-2
    assert d.head_dim == 16


def test_step_module_eager_equals_program(model, step):
    cap, run = step
    inputs = (_prompts(2, 3), _positions(2, 5, 3), _garbage_past(cap.dims, 2, 5),
              _chain_mask(2, 3, 5, 5))
    with torch.no_grad():
        eager = StepModule(model)(*inputs)
    for got, want in zip(run(*inputs), eager, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_models_are_refused(name):
    model = tiny_model(name)
    with pytest.raises(UnsupportedModelError, match=UNSUPPORTED[name]) as err:
        capture(model, CaptureOptions(max_seq=64))
    assert str(err.value).startswith(model.config.model_type)
    assert model.config.model_type not in str(err.value).split(": ", 1)[1]  # by feature


def test_window_layout_follows_max_seq():
    """A window no shorter than max-seq never hides a key: those layers get the step mask."""
    model = tiny_model("mistral_window")  # window 16, every layer
    assert MaskLayout.of(model, CaptureOptions(max_seq=17, max_new=4)) == MaskLayout(16)
    assert MaskLayout.of(model, CaptureOptions(max_seq=16, max_new=4)) == MaskLayout(None)
    mixed = tiny_model("gemma3_text")  # a windowed layer, then a full one
    assert MaskLayout.of(mixed, CaptureOptions(max_seq=64)) == MaskLayout(16, per_type=True)


@pytest.mark.parametrize("name", ["mistral_window", "gemma3_text"])
def test_windowed_program_matches_hf_past_the_window(name):
    """Each step's keys reach back at most 16 positions in windowed layers: a prompt of 20
    (fed 8 + 8 + 4) then a decode step at position 20 equal the model's own forward."""
    model = tiny_model(name)
    module = captured(name).program.module()
    dims = captured(name).dims
    prompt = _prompts(1, 21, seed=2)
    with torch.no_grad():
        want = model(input_ids=prompt).logits
    past = _garbage_past(dims, 1, 1)
    got = []
    for start, stop in ((0, 8), (8, 16), (16, 20), (20, 21)):
        slots = past.shape[4]
        with torch.no_grad():
            logits, present = module(prompt[:, start:stop], _positions(1, start, stop - start),
                                     past, _chain_mask(1, stop - start, start, slots))
        past = present if start == 0 else torch.cat([past, present], dim=4)
        got.append(logits)
    torch.testing.assert_close(torch.cat(got, dim=1), want)


def test_a_capture_that_computes_otherwise_is_refused(monkeypatch):
    """The capture check compares the program with the model's own forward: a step module
    that hands the model a different mask (the window dropped) is refused, not returned."""
    import leapc.ir.capture as capture_module

    monkeypatch.setattr(capture_module.MaskLayout, "of", lambda model, options: MaskLayout())
    with pytest.raises(UnsupportedModelError, match="does not compute the model's own logits"):
        capture(tiny_model("mistral_window"), CaptureOptions(max_seq=64, max_new=16))


def test_untraceable_model_is_refused(monkeypatch):
    """Past the config checks, an export failure still surfaces as UnsupportedModelError."""
    import leapc.ir.capture as capture_module

    monkeypatch.setattr(capture_module, "check_supported", lambda model: None)
    with pytest.raises(UnsupportedModelError, match="torch.export cannot capture"):
        capture(tiny_model("llama_dynamic_rope"), CaptureOptions(max_seq=64))


@pytest.mark.parametrize("name", ["llama", "gemma"])  # untied and tied LM heads
def test_tiny_checkpoint_round_trips(name, tmp_path):
    directory = tiny_checkpoint(name, tmp_path / name)
    loaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokens = _prompts(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, tiny_model(name)(tokens).logits)
