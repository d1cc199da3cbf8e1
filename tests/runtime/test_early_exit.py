"""Early-exit self-speculation (policies early-exit, kangaroo): greedy output equals `ar`,
the KV cache (Kangaroo's adapter rows too) ends as one pass over the committed tokens
leaves it, sampling keeps the model's distribution (rule 2 with q the exit's distribution). The CLI's exit-layer errors are in tests/cli/test_cli.py."""

from __future__ import annotations

import numpy as np
import pytest
from engines import EXIT_LAYERS
from stats import chi2_critical, chi2_homogeneity, second_and_third, with_uniform_q

import leapc
from leapc.runtime.decode import GenerationStats, StopConfig, decode
from leapc.runtime.drafters.early_exit import EarlyExitDrafter
from leapc.runtime.manifest import Attention
from leapc.runtime.policies import DraftOptions
from leapc.runtime.sampling import SamplingConfig

PROMPTS = {
    "bundled": ["def add(a, b):\n    return", "import os\n\n\ndef read_lines(path):\n"],
    "stories": ["Once upon a time, there was a little girl", "One day, Tom went to the park"],
    "tiny-llama": [[5, 17, 33, 2, 9], [100, 7, 7, 40]],
}
EXIT_POLICIES = ("early-exit", "kangaroo")
CASES = [("bundled", "ort"), ("stories", "ort"), ("tiny-llama", "ort"), ("tiny-llama", "eager")]


@pytest.mark.parametrize(("key", "backend"), CASES)
def test_greedy_output_equals_ar(exit_engine_dir, key, backend):
    engine = leapc.load(exit_engine_dir(key, backend))
    for prompt in PROMPTS[key]:
        reference = engine.generate(prompt, 48).token_ids
        for policy in EXIT_POLICIES:
            for length in (1, 4):
                got = engine.generate(prompt, 48, policy=policy,
                                      draft=DraftOptions(max_draft=length)).token_ids
                assert got == reference, (policy, length, prompt)


@pytest.mark.parametrize(("key", "backend"), CASES)
def test_the_unrolled_chain_drafts_what_step_by_step_calls_draft(exit_engine_dir, key, backend):
    """``draft_chain`` (one call per chain) against the same engine without it: the same
    drafts, so the same steps, confidence stops included, and `ar`'s tokens."""
    engine = leapc.load(exit_engine_dir(key, backend))
    # Only ORT's tree lowering gets a chain (`early_exit._builds_chain`).
    exact = backend == "ort" and engine.manifest.attention is Attention.TREE
    assert ("draft_chain" in engine.manifest.programs) == exact
    if not exact:
        return
    stepwise = leapc.load(engine.path)
    programs = {k: v for k, v in engine.manifest.programs.items() if k != "draft_chain"}
    stepwise.manifest = engine.manifest.model_copy(update={"programs": programs})
    depth = engine.manifest.exit_choice.depth
    for prompt in PROMPTS[key]:
        reference = engine.generate(prompt, 48).token_ids
        for options in (DraftOptions(), DraftOptions(max_draft=depth, confidence=0.05)):
            chained = engine.generate(prompt, 48, policy="early-exit", draft=options)
            stepped = stepwise.generate(prompt, 48, policy="early-exit", draft=options)
            assert chained.token_ids == stepped.token_ids == reference
            assert chained.stats.steps == stepped.stats.steps
            # Every step after the prefill drafts in one call, unless the token budget
            # leaves no room for a draft (then its root's call is a plain draft call).
            calls = chained.stats.calls
            assert calls["draft_chain"] + calls["draft"] == chained.stats.steps - 1
            assert calls["draft"] <= 1
            assert "draft_chain" not in stepped.stats.calls


def _run(engine, prompt, policy: str, sampling=SamplingConfig()) -> tuple:
    """Generate; return the target cache and the generation's stats."""
    ids = engine.encode(prompt)
    cache = engine.new_cache(policy)
    # A low stop: the tiny models' drafts are rarely confident.
    drafter = engine.drafter(policy, cache, DraftOptions(max_draft=4, confidence=0.01),
                             sampling)
    stats = GenerationStats(policy)
    list(decode(engine.step, cache, ids, engine.manifest.max_new, drafter, sampling,
                StopConfig(40, ()), np.random.default_rng(0), stats))
    return cache, stats


@pytest.mark.parametrize("key", ["bundled", "tiny-llama"])
def test_kv_cache_ends_as_ar_leaves_it(exit_engine_dir, key):
    """The draft writes layers < E in the target's cache and the remainder layers >= E:
    after rejected drafts and reused rows the cache equals `ar`'s, every layer."""
    engine = leapc.load(exit_engine_dir(key))
    prompt = PROMPTS[key][0]
    reference, _ = _run(engine, prompt, "ar")
    cache, stats = _run(engine, prompt, "early-exit")
    assert max(stats.accepted_depth) > 0 and min(stats.accepted_depth) < 4, \
        "the test needs both accepted and rejected drafts"
    assert cache.length == reference.length
    rows = reference.buffer[:, :, :, :, : reference.length]  # [L, 2, B, H, T, D]
    np.testing.assert_allclose(cache.buffer[:, :, :, :, : cache.length], rows, atol=1e-4)


def test_the_draft_program_holds_layers_below_the_exit(exit_engine_dir):
    engine = leapc.load(exit_engine_dir("tiny-llama"))
    manifest = engine.manifest
    assert manifest.exit_layer == EXIT_LAYERS["tiny-llama"]

    def names(program: str, kind: str) -> list[str]:
        return [o["name"] for o in manifest.programs[program].signature[kind]]

    assert names("draft", "outputs") == ["logits", "present", "hidden"]
    assert names("remainder", "inputs") == ["hidden", "positions", "past", "mask"]
    assert names("remainder", "outputs") == ["logits", "present"]
    assert names("kangaroo", "inputs") == ["tokens", "positions", "past", "adapter_past", "mask"]
    assert names("kangaroo", "outputs") == ["logits", "present", "hidden", "adapter_present"]
    assert {"early-exit", "kangaroo"} <= {p.value for p in manifest.policies}
    assert manifest.adapter.steps == 6
    assert (engine.path / "adapter" / "adapter.safetensors").is_file()


def test_kangaroo_defaults_are_the_fastest_measured_point(exit_engine_dir):
    from leapc.early_exit import KANGAROO_CONFIDENCES, KANGAROO_DEPTHS
    from leapc.inspection import inspect_engine

    path = exit_engine_dir("tiny-llama")
    adapter = leapc.load(path).manifest.adapter
    assert [(p.depth, p.confidence) for p in adapter.sweep] == [
        (d, c) for d in KANGAROO_DEPTHS for c in KANGAROO_CONFIDENCES]
    best = max(adapter.sweep, key=lambda p: p.tokens_per_s)
    assert (adapter.depth, adapter.confidence) == (best.depth, best.confidence)
    assert adapter.ar_tokens_per_s > 0
    titles = [table.title for table in inspect_engine(path)]
    assert f"kangaroo · draft length {best.depth}, stop below {best.confidence} (auto)" in titles


@pytest.mark.parametrize("key", ["bundled", "tiny-llama"])
def test_kangaroo_adapter_rows_equal_one_pass_over_the_committed_tokens(exit_engine_dir, key):
    """The adapter's KV rows, computed for the prompt at once and then one chain node at a
    time as scratch (rejected nodes overwritten later), are those of one draft call over
    every committed token."""
    engine = leapc.load(exit_engine_dir(key))
    cache, stats = _run(engine, PROMPTS[key][1], "kangaroo")
    assert max(stats.accepted_depth) > 0 and min(stats.accepted_depth) < max(stats.drafted_depth)
    reference, _ = _run(engine, PROMPTS[key][1], "ar")
    tokens = _committed_tokens(engine, PROMPTS[key][1], cache.length)
    n, layers = len(tokens), engine.manifest.model.dims.num_layers
    mask = np.concatenate([np.zeros((n, 1), bool), np.tri(n, dtype=bool)], axis=1)[None]
    past = np.zeros_like(reference.buffer[:, :, :, :, :1])
    out = engine.program("kangaroo")(np.asarray([tokens]), np.arange(n)[None],
                                   past[: engine.manifest.exit_layer], past[:1], mask)
    np.testing.assert_allclose(cache.buffer[layers:, :, :, :, :n], out["adapter_present"],
                               atol=1e-4)
    np.testing.assert_allclose(cache.buffer[:layers, :, :, :, :n],
                               reference.buffer[:, :, :, :, :n], atol=1e-4)


def _committed_tokens(engine, prompt, length: int) -> list[int]:
    ids = engine.encode(prompt)
    return (ids + engine.generate(prompt, length).token_ids)[:length]


def test_only_the_drafts_vocabulary_projection_is_int8(exit_engine_dir):
    """The exit's logits only propose; the hidden state and KV rows the target reuses are
    computed in float32, and the remainder is untouched."""
    import onnx

    path = exit_engine_dir("tiny-llama")

    def matmuls(program: str) -> list[str]:
        graph = onnx.load(str(path / f"{program}.onnx")).graph
        return sorted(n.op_type for n in graph.node if n.op_type.startswith("MatMul"))

    draft = matmuls("draft")
    assert draft.count("MatMulNBits") == 1 and draft.count("MatMul") > 1
    assert "MatMulNBits" not in matmuls("remainder")


@pytest.mark.shared
@pytest.mark.parametrize(("policy", "wrong_q"), [("early-exit", False), ("kangaroo", False),
                                               ("early-exit", True)],
                         ids=["exit-q", "kangaroo-q", "uniform-q"])
def test_sampling_matches_plain_sampling_only_with_the_exit_q(exit_engine_dir, monkeypatch,
                                                               policy, wrong_q):
    """Rule 2 with q the exit's (or adapter's) distribution actually sampled keeps the
    output distribution; the same draws checked against a wrong q do not (the test sees q)."""
    engine = leapc.load(exit_engine_dir("stories"))
    draft = DraftOptions(max_draft=2, confidence=0.01)
    plain = second_and_third(engine, "ar", 0, draft)
    if wrong_q:
        with_uniform_q(monkeypatch, EarlyExitDrafter)
    drafted = second_and_third(engine, policy, 10**6, draft)
    stat, df = chi2_homogeneity(plain, drafted)
    assert df >= 3, "the test needs a distribution with several outcomes"
    assert bool(stat > chi2_critical(df)) is wrong_q, (stat, df)


@pytest.mark.slow  # a sweep
def test_exit_layer_auto_keeps_the_fastest_measured_point(tmp_path):
    """`--exit-layer auto` lowers every candidate, measures each (layer, draft length), and
    keeps the fastest; the policy then drafts that many tokens by default."""
    from engines import tiny_source

    from leapc.early_exit import EXIT_DEPTHS, exit_candidates
    from leapc.inspection import inspect_engine

    engine = leapc.load(leapc.build(tiny_source("llama"), tmp_path / "auto", "ort", max_seq=256,
                                    exit_layer="auto"))
    manifest = engine.manifest
    choice = manifest.exit_choice
    candidates = list(exit_candidates(manifest.model.dims.num_layers))
    assert choice.source == "auto" and choice.ar_tokens_per_s > 0
    assert [(p.layer, p.depth) for p in choice.sweep] == [
        (layer, depth) for layer in candidates for depth in EXIT_DEPTHS]
    best = max(choice.sweep, key=lambda p: p.tokens_per_s)
    assert (manifest.exit_layer, choice.depth) == (best.layer, best.depth)
    assert not (tmp_path / "auto" / ".exit-sweep").exists()
    assert "kangaroo" not in {p.value for p in manifest.policies}  # no adapter trained
    prompt = PROMPTS["tiny-llama"][0]
    stats = engine.generate(prompt, 24, policy="early-exit").stats
    assert max(stats.drafted_depth) == choice.depth
    assert engine.generate(prompt, 24, policy="early-exit").token_ids == \
        engine.generate(prompt, 24).token_ids
    titles = [table.title for table in inspect_engine(tmp_path / "auto")]
    assert f"early exit · layer {best.layer} of {manifest.model.dims.num_layers}, draft length " \
           f"{best.depth} (auto)" in titles
