"""Layer-skip self-speculation (policy layer-skip): greedy output equals `ar`, the draft's
scratch rows leave the cache as `ar` leaves it, sampling keeps the model's distribution
(rule 2 with q the skip draft's distribution)."""

from __future__ import annotations

import numpy as np
import pytest
from engines import SKIP_SETS
from stats import chi2_critical, chi2_homogeneity, second_and_third, with_uniform_q

import leapc
from leapc.runtime.decode import GenerationStats, StopConfig, decode
from leapc.runtime.drafters.cache_chain import LayerSkipDrafter
from leapc.runtime.policies import DraftOptions
from leapc.runtime.sampling import SamplingConfig

PROMPTS = {
    "bundled": ["def add(a, b):\n    return", "import os\n\n\ndef read_lines(path):\n"],
    "stories": ["Once upon a time, there was a little girl", "One day, Tom went to the park"],
    "tiny-llama": [[5, 17, 33, 2, 9], [100, 7, 7, 40]],
}
CASES = [("bundled", "ort"), ("stories", "ort"), ("tiny-llama", "ort"), ("tiny-llama", "eager")]


@pytest.mark.parametrize(("key", "backend"), CASES)
def test_greedy_output_equals_ar(skip_engine_dir, key, backend):
    engine = leapc.load(skip_engine_dir(key, backend))
    assert engine.manifest.skip is not None and "layer-skip" in engine.manifest.policies
    for prompt in PROMPTS[key]:
        reference = engine.generate(prompt, 48).token_ids
        for draft in (DraftOptions(max_draft=1), DraftOptions(max_draft=4),
                      DraftOptions(max_draft=6, confidence=0.6)):
            for policy in ("layer-skip", "swift"):
                got = engine.generate(prompt, 48, policy=policy, draft=draft).token_ids
                assert got == reference, (policy, draft, prompt)


def test_the_skip_set_is_recorded_and_the_draft_bypasses_it(skip_engine_dir):
    engine = leapc.load(skip_engine_dir("tiny-llama"))
    assert engine.manifest.skip == SKIP_SETS["tiny-llama"]
    assert engine.manifest.skip_choice.candidates == (SKIP_SETS["tiny-llama"],)
    entry = engine.manifest.programs["skip_0"]
    assert entry.signature == engine.manifest.programs["full"].signature
    assert {"layer-skip", "swift"} <= {p.value for p in engine.manifest.policies}


def test_scratch_rows_leave_the_cache_as_ar_leaves_it(skip_engine_dir):
    """The draft writes every layer's rows after the committed ones; commits overwrite them,
    so after accepted and rejected drafts the committed cache equals `ar`'s."""
    engine = leapc.load(skip_engine_dir("bundled"))
    caches = {}
    for policy in ("ar", "layer-skip"):
        cache = engine.new_cache(policy)
        sampling = SamplingConfig()
        drafter = engine.drafter(policy, cache, DraftOptions(max_draft=4), sampling)
        stats = GenerationStats(policy)
        list(decode(engine.step, cache, engine.encode(PROMPTS["bundled"][1]),
                    engine.manifest.max_new, drafter, sampling, StopConfig(40, ()),
                    np.random.default_rng(0), stats))
        caches[policy] = (cache, stats)
    (reference, _), (cache, stats) = caches["ar"], caches["layer-skip"]
    assert max(stats.accepted_depth) > 0 and min(stats.accepted_depth) < 4
    assert cache.length == reference.length
    np.testing.assert_allclose(cache.buffer[..., : cache.length, :],
                               reference.buffer[..., : reference.length, :], atol=1e-4)


@pytest.mark.shared
@pytest.mark.parametrize(("policy", "wrong_q"), [("layer-skip", False), ("swift", False),
                                               ("layer-skip", True)],
                         ids=["skip-q", "swift-q", "uniform-q"])
def test_sampling_matches_plain_sampling_only_with_the_drafts_q(skip_engine_dir, monkeypatch,
                                                                policy, wrong_q):
    """Rule 2 with the skip draft's q (swift: of the set it scored best on the window)."""
    engine = leapc.load(skip_engine_dir("stories"))
    draft = DraftOptions(max_draft=2, confidence=0.01)
    plain = second_and_third(engine, "ar", 0, draft)
    if wrong_q:
        with_uniform_q(monkeypatch, LayerSkipDrafter)
    drafted = second_and_third(engine, policy, 10**6, draft)
    stat, df = chi2_homogeneity(plain, drafted)
    assert df >= 3, "the test needs a distribution with several outcomes"
    assert bool(stat > chi2_critical(df)) is wrong_q, (stat, df)


@pytest.mark.slow  # a search and a sweep
def test_skip_auto_keeps_the_fastest_measured_set_of_the_agreement_path(tmp_path):
    """`--skip auto`: the greedy path grows one sublayer a step, the candidates are its sets,
    each measured at every draft length; the fastest is the engine's, its length the
    policy's default."""
    from engines import tiny_source

    from leapc.ir.skip_spec import SkipSet
    from leapc.layer_skip import SKIP_DEPTHS, candidates

    engine = leapc.load(leapc.build(tiny_source("llama"), tmp_path / "auto", "ort", max_seq=256,
                                    skip="auto"))
    manifest = engine.manifest
    choice, layers = manifest.skip_choice, manifest.model.dims.num_layers
    assert choice.source == "auto" and choice.ar_tokens_per_s > 0
    path = [(SkipSet.parse(text, layers), agreement) for text, agreement in choice.path]
    sets = [s for s, _ in path]
    assert [s.size for s in sets] == list(range(1, len(sets) + 1))
    assert all(a.attention <= b.attention and a.mlp <= b.mlp
               for a, b in zip(sets, sets[1:], strict=False))
    measured = [str(s) for s in candidates(path, layers)]
    assert [(p.skip, p.depth) for p in choice.points] == [
        (s, d) for s in measured for d in SKIP_DEPTHS]
    best = max(choice.points, key=lambda p: p.tokens_per_s)
    assert (manifest.skip, choice.depth) == (best.skip, best.depth)
    assert choice.candidates == tuple(measured)
    assert [f"skip_{i}" for i in range(len(measured))] == [
        name for name in manifest.programs if name.startswith("skip_")]
    prompt = PROMPTS["tiny-llama"][0]
    generation = engine.generate(prompt, 24, policy="layer-skip")
    assert max(generation.stats.drafted_depth) == choice.depth
    assert generation.token_ids == engine.generate(prompt, 24).token_ids


def test_swift_scores_sets_on_the_window_and_drafts_with_the_fastest_expected():
    """Fake sets with known agreement on the window and known cost: swift picks the best
    (1 - a^(d+1)) / (1 - a) / (d r + 1), rescoring every ``rescore_every`` steps, and
    never writes the window's rows."""
    import time

    from leapc.ir.tree import chain
    from leapc.runtime.drafters.base import Draft
    from leapc.runtime.drafters.swift import SwiftDrafter, expected_speedup
    from leapc.runtime.kv_cache import KVCache

    cache = KVCache(2, 1, 4, "float32", max_seq=128)
    cache.commit(np.ones((2, 2, 1, 1, 40, 4), np.float32), np.arange(40))
    before = cache.buffer.copy()
    context = list(range(40))
    vocab = 64

    class Fake:
        """Predicts the following token at every ``every``-th window position."""

        def __init__(self, every: int, seconds: float):
            self.every, self.seconds, self.cache, self.max_depth = every, seconds, cache, 4
            self.proposed = 0

        def _run(self, tokens, positions, past, mask):
            time.sleep(self.seconds)
            following = np.append(tokens[0, 1:], 99 % vocab)
            guess = np.where(np.arange(len(following)) % self.every == 0, following,
                             following + 1)
            return {"logits": np.eye(vocab)[guess][None]}

        def propose(self, context, root, budget):
            self.proposed += 1
            return Draft(np.asarray([root], dtype=np.int64), chain(0))

        def observe(self, context, result):
            pass

    def full(tokens, positions, past, mask):
        time.sleep(0.1)
        return {}

    # a = 1, 1/2, 1/4 (the root, 99, is the window's last following token); costs 0.9,
    # 0.1, 0.05 of a full step: the accurate-but-slow and the cheap-but-wrong lose. (Sleeps
    # of a few ms overshoot by as much on a busy machine: these are long enough not to.)
    fakes = [Fake(1, 0.09), Fake(2, 0.01), Fake(4, 0.005)]
    swift = SwiftDrafter(fakes, full, window=32, rescore_every=5)
    for _ in range(7):
        swift.propose(context, 99, 8)
    assert swift.current == 1 and [f.proposed for f in fakes] == [0, 7, 0]
    assert np.argmax(swift.scores) == 1
    assert expected_speedup(1.0, 4, 0.9) < expected_speedup(0.5, 4, 0.1)
    np.testing.assert_array_equal(cache.buffer, before)
    assert cache.length == 40


@pytest.mark.parametrize(("length", "chunk", "window"),
                         [(94, None, 32), (94, 8, 8), (20, None, 20)])
def test_swift_scores_the_window_within_the_programs_bounds(length, chunk, window):
    """Near max_seq the window's forward passes only the slots before the window as its
    past (``T + N`` = the cache's length); ``chunk`` (N's bound) caps the window; with no
    room left to draft, nothing is scored."""
    from leapc.ir.tree import chain
    from leapc.runtime.drafters.base import Draft
    from leapc.runtime.drafters.swift import SwiftDrafter
    from leapc.runtime.kv_cache import KVCache

    max_seq = 96
    cache = KVCache(2, 1, 4, "float32", max_seq=max_seq)
    cache.commit(np.ones((2, 2, 1, 1, length, 4), np.float32), np.arange(length))
    calls = []

    def run(tokens, positions, past, mask):
        n = tokens.shape[1]
        assert past.shape[4] + n <= max_seq and mask.shape[2] == past.shape[4] + n
        calls.append((n, int(positions[0, 0])))
        return {"logits": np.zeros((1, n, 8), np.float32)}

    class Fake:
        def __init__(self):
            self.cache, self.max_depth, self._run = cache, 3, run

        def propose(self, context, root, budget):
            return Draft(np.asarray([root], dtype=np.int64), chain(0))

    swift = SwiftDrafter([Fake()], run, window=32, chunk=chunk)
    swift.propose(list(range(length)), 7, 0)  # the last token before a limit: no scoring
    assert calls == []
    swift._steps = 0
    swift.propose(list(range(length)), 7, 1)
    assert calls == [(window, length - window)] * 2  # the full step's, then the candidate's
