"""``--draft-vocab K``: the draft programs propose only the K most frequent tokens of a
text; verification is unchanged, so every policy still emits `ar`'s tokens."""

from __future__ import annotations

import numpy as np
import pytest
from engines import tiny_source
from tokenizers import pre_tokenizers

import leapc
from leapc.draft_vocabulary import TILE, DraftVocabularyOptions, frequent_tokens
from leapc.ir.errors import InputError
from leapc.runtime.decode import tree_inputs
from leapc.runtime.drafters.base import Draft
from leapc.runtime.policies import DraftOptions

PROMPTS = [[5, 17, 33, 2, 9], [100, 7, 7, 40]]
# The text's most frequent tokens: 7 most, then 3, 5 and 100 (ties: the lower id first).
TEXT = " ".join(["7"] * 9 + ["3", "5", "100"] * 4 + ["12"] * 2)


def _source():
    source = tiny_source("llama")
    source.tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return source


def test_the_most_frequent_tokens_and_the_kept_ones_fill_whole_tiles(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    options = DraftVocabularyOptions(TILE - 3, [tmp_path / "text.txt"])
    ids = frequent_tokens(_source().tokenizer, options, 256, keep=(255,))
    assert len(ids) == TILE and list(ids) == sorted(ids)
    seen = {3, 5, 7, 12, 100, 255}
    unseen = [i for i in range(256) if i not in seen][: TILE - len(seen)]
    assert set(ids) == seen | set(unseen)  # ties at count 0: the lowest ids


def test_a_size_of_the_whole_vocabulary_or_none_is_refused():
    for size in (0, 256):
        with pytest.raises(InputError, match="--draft-vocab must be between 1 and"):
            frequent_tokens(_source().tokenizer, DraftVocabularyOptions(size), 256, ())


# The engine below exports five programs (~15 s): its tests are the full suite's.
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny Llama with an early exit and a layer-skip draft, both proposing 16 tokens."""
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text(TEXT)
    out = tmp_path_factory.mktemp("engine") / "engine"
    leapc.build(_source(), out, "ort", max_seq=256, exit_layer=1, skip="m0,a1",
                draft_vocab=DraftVocabularyOptions(TILE, [text]))
    return leapc.load(out)


@pytest.mark.slow
def test_drafts_propose_only_the_chosen_tokens(engine):
    assert engine.manifest.draft_vocabulary == TILE
    cache = engine.new_cache()
    out = engine.program("draft")(*tree_inputs(cache, Draft.chain_of(5, [17, 33])))
    chosen = np.isfinite(out["logits"][0])
    assert (chosen.sum(-1) == TILE).all()
    assert chosen[:, [3, 5, 7, 12, 100]].all()
    full = engine.program("full")(*tree_inputs(cache, Draft.chain_of(5, [17, 33])))
    assert np.isfinite(full["logits"]).all()  # the target's head is untouched


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["early-exit", "layer-skip"])
def test_greedy_output_is_still_ar(engine, policy):
    for prompt in PROMPTS:
        reference = engine.generate(prompt, 40).token_ids
        for length in (1, 4):
            got = engine.generate(prompt, 40, policy=policy,
                                  draft=DraftOptions(max_draft=length)).token_ids
            assert got == reference, (policy, length, prompt)
