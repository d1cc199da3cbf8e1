"""The end of the context: every policy drafts less, then stops, at max_seq; never raises.

One small-context engine holds a program for every policy (a draft model, a datastore,
Hydra heads, an early exit with a Kangaroo adapter, a layer-skip set). Prompts of lengths
that leave a few tokens, a chain's worth, or most of the context run every policy to
max_seq: the output fills the context exactly (prompt + output = max_seq), the stop
reason says so, and greedy output is `ar`'s token for token. (Building that engine trains
heads and an adapter: every test using it is slow.)
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from engines import TRAINING_FREE, tiny_source
from tokenizers import pre_tokenizers

import leapc
from leapc.early_exit import AdapterOptions
from leapc.heads import HeadsOptions
from leapc.ir.head_spec import HeadKind
from leapc.models.loaders import SourceModel
from leapc.models.train_adapter import AdapterTraining
from leapc.runtime.decode import GenerationStats, StopConfig, StopReason, decode, draft_budget
from leapc.runtime.drafters.base import Draft
from leapc.runtime.drafters.heads import DynamicTree
from leapc.runtime.drafters.lookahead import LookaheadConfig
from leapc.runtime.drafters.retrieval import RetrievalConfig
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.policies import DraftOptions
from leapc.runtime.sampling import SamplingConfig

MAX_SEQ = 96
MAX_NEW = 32  # N's bound: swift's 32-token scoring window just fits
ALL_POLICIES = {*TRAINING_FREE, "draft", "retrieval", "hydra", "hydra-dynamic", "early-exit",
                "kangaroo", "layer-skip", "swift"}
# The datastore's and the heads' text: a fixed id sequence, so prompts cut from it retrieve.
CORPUS = [3 + (i * 7919) % 250 for i in range(4000)]
# Prompt lengths: the last token only, a few tokens, a chain or tree's worth, most of it.
LENGTHS = (95, 94, 92, 88, 77, 50, 1)


def _close_copy(source: SourceModel) -> SourceModel:
    """A draft model that agrees with the target often, so drafts run deep to the end."""
    model = copy.deepcopy(source.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return SourceModel(model, source.tokenizer, "close-draft", source.bos_id, source.eos_ids)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    source = tiny_source("llama")
    source.tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the text is ids
    work = tmp_path_factory.mktemp("context-limit")
    text = work / "ids.txt"
    text.write_text(" ".join(map(str, CORPUS)))
    heads = HeadsOptions(count=2, kind=HeadKind.HYDRA, train_text=[text], training_steps=5,
                         training_sequences=8, training_context=32)
    adapter = AdapterOptions(work / "adapter", AdapterTraining(steps=6, sequences=8,
                                                               eval_sequences=2, context=64))
    path = leapc.build(source, work / "engine", "ort", max_seq=MAX_SEQ, max_new=MAX_NEW,
                       draft_model=_close_copy(source), datastore=[text], heads=heads,
                       exit_layer=1, adapter=adapter, skip="m0,a1")
    built = leapc.load(path)
    assert {p.value for p in built.manifest.policies} == ALL_POLICIES
    return built


def _prompts() -> list[list[int]]:
    """Per length: random ids, the same ids repeated (prompt lookup drafts), and a cut of
    the corpus (retrieval drafts)."""
    rng = np.random.default_rng(14)
    prompts = []
    for length in LENGTHS:
        unit = rng.integers(3, 256, size=7).tolist()
        start = int(rng.integers(0, len(CORPUS) - length))
        prompts += [rng.integers(3, 256, size=length).tolist(), (unit * length)[:length],
                    CORPUS[start : start + length]]
    return prompts


@pytest.mark.slow
def test_every_policy_runs_to_max_seq_and_matches_ar(engine):
    for prompt in _prompts():
        ar = engine.generate(prompt, 2 * MAX_SEQ)
        assert len(prompt) + len(ar.token_ids) == MAX_SEQ
        for policy in sorted(ALL_POLICIES):
            got = engine.generate(prompt, 2 * MAX_SEQ, policy=policy)
            assert got.token_ids == ar.token_ids, (policy, len(prompt))
            assert got.stats.stop_reason is StopReason.MAX_SEQ, (policy, len(prompt))
            assert got.stats.as_dict()["stop_reason"] == "max_seq"


# Drafts as long as a step takes (a very low stop, so chains do not end on their own).
LONG = DraftOptions(max_draft=MAX_NEW - 1, confidence=1e-6)
LONG_DRAFTS = [
    *((policy, LONG) for policy in ("lookup", "draft", "early-exit", "kangaroo", "layer-skip",
                                    "swift")),
    ("draft", DraftOptions(max_draft=8, branching=(3, 2))),
    ("retrieval", DraftOptions(retrieval=RetrievalConfig(nodes=MAX_NEW - 1, min_probability=0))),
    ("lookahead", DraftOptions(lookahead=LookaheadConfig(5, 4, 5))),
    ("hydra-dynamic", DraftOptions(dynamic=DynamicTree(total=MAX_NEW - 1, beam=6))),
]


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "options"), LONG_DRAFTS,
                         ids=[f"{p}-{i}" for i, (p, _) in enumerate(LONG_DRAFTS)])
def test_long_drafts_shrink_to_the_room_left(engine, policy, options):
    """Drafts up to the step's bound must shrink to what is left near max_seq."""
    for length in (95, 93, 88, 70):
        prompt = CORPUS[:length]
        ar = engine.generate(prompt, 2 * MAX_SEQ).token_ids
        got = engine.generate(prompt, 2 * MAX_SEQ, policy=policy, draft=options)
        assert got.token_ids == ar and got.stats.stop_reason is StopReason.MAX_SEQ, length


@pytest.mark.slow
@pytest.mark.parametrize("policy", sorted(ALL_POLICIES))
def test_sampling_runs_to_max_seq(engine, policy):
    for length in (94, 80):
        out = engine.generate(CORPUS[:length], 2 * MAX_SEQ, policy=policy, temperature=0.8,
                              seed=length)
        assert length + len(out.token_ids) == MAX_SEQ
        assert out.stats.stop_reason is StopReason.MAX_SEQ


@pytest.mark.slow
def test_stop_reason_when_limits_meet(engine):
    """The token budget that ends exactly at max_seq ends the request's budget; an EOS
    there is an EOS."""
    prompt = CORPUS[:80]
    ar = engine.generate(prompt, 2 * MAX_SEQ).token_ids
    assert engine.generate(prompt, 5, policy="lookup").stats.stop_reason is \
        StopReason.MAX_NEW_TOKENS
    exact = engine.generate(prompt, MAX_SEQ - 80, policy="lookup")
    assert exact.token_ids == ar and exact.stats.stop_reason is StopReason.MAX_NEW_TOKENS
    tokenizer = engine.manifest.tokenizer.model_copy(update={"eos_ids": (ar[-1],)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "manifest",
                      engine.manifest.model_copy(update={"tokenizer": tokenizer}))
        eos = engine.generate(prompt, 2 * MAX_SEQ, policy="early-exit")
    assert eos.token_ids == ar[: ar.index(ar[-1]) + 1]
    assert eos.stats.stop_reason is StopReason.EOS


@pytest.mark.slow
def test_a_prompt_one_short_of_max_seq_emits_one_token(engine):
    for policy in ("ar", "swift", "kangaroo"):
        out = engine.generate(CORPUS[: MAX_SEQ - 1], 10, policy=policy)
        assert len(out.token_ids) == 1 and out.stats.stop_reason is StopReason.MAX_SEQ


def test_draft_budget_leaves_the_bonus_token_inside_max_seq():
    cache = KVCache(1, 1, 2, "float32", max_seq=MAX_SEQ)
    stop = StopConfig(1000, ())
    # A whole chain of ``budget`` accepted puts the bonus token at position
    # length + budget + 1: max_seq - 1 at most.
    for length, expected in ((0, MAX_NEW - 1), (80, 14), (93, 1), (94, 0)):
        cache.length = length
        assert draft_budget(cache.length, cache.max_seq, MAX_NEW, stop, 0) == expected
    cache.length = 10
    assert draft_budget(cache.length, cache.max_seq, MAX_NEW, StopConfig(5, ()), 3) == 1


@pytest.mark.slow
def test_a_draft_over_its_budget_is_named(engine):
    class Greedy:
        """Ignores its budget: a drafter bug the loop reports before the step fails."""

        def propose(self, context, root, budget):
            return Draft.chain_of(root, [root] * (budget + 1))

        def observe(self, context, result):
            pass

    cache = engine.new_cache()
    run = decode(engine.step, cache, [5, 6, 7], MAX_NEW, Greedy(), SamplingConfig(),
                 StopConfig(100, ()), np.random.default_rng(0), GenerationStats("greedy"))
    with pytest.raises(RuntimeError, match="Greedy drafted 32 nodes; the step's budget was 31"):
        list(run)


@pytest.mark.slow
def test_decode_refuses_a_prompt_that_leaves_nothing_to_generate(engine):
    cache = engine.new_cache()
    run = decode(engine.step, cache, list(range(MAX_SEQ)), MAX_NEW, None, SamplingConfig(),
                 StopConfig(10, ()), np.random.default_rng(0), GenerationStats("ar"))
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        next(run)
