"""Retrieval drafting: the tree merges the context's continuation and the datastore's."""

from __future__ import annotations

import json

import numpy as np
import pytest

import leapc
from leapc.ir.errors import EngineError, InputError
from leapc.runtime.datastore import Datastore
from leapc.runtime.drafters.retrieval import RetrievalConfig, RetrievalDrafter

# After token 3 the corpus continues 4 4 (three times) or 5 (once).
CORPUS = [[3, 4, 4, 9], [3, 4, 4, 8], [3, 4, 4, 8], [3, 5]]


def paths(draft) -> set[tuple[int, ...]]:
    """Every root-to-node token path of a draft, root excluded."""
    tokens, parents = draft.tokens.tolist(), draft.tree.parents.tolist()
    found = set()
    for node in range(1, len(tokens)):
        path, at = [], node
        while at > 0:
            path.append(tokens[at])
            at = parents[at]
        found.add(tuple(reversed(path)))
    return found


def drafter(nodes: int, min_probability: float = 0.0, **options) -> RetrievalDrafter:
    store = Datastore.build(CORPUS, depth=6)
    config = RetrievalConfig(nodes=nodes, min_probability=min_probability, max_ngram=2, length=3)
    return RetrievalDrafter(store, config, **options)


def test_the_corpus_fills_the_tree_most_frequent_first():
    draft = drafter(nodes=3).propose([1, 2], 3, budget=20)  # no earlier 3 in the context
    assert paths(draft) == {(4,), (4, 4), (4, 4, 8)}
    assert paths(drafter(nodes=4).propose([1, 2], 3, budget=20)) == \
        {(4,), (4, 4), (4, 4, 8), (5,)}


def test_unlikely_nodes_are_left_out():
    # shares of the four occurrences of 3: (4,) 3/4, (4, 4) 3/4, (4, 4, 8) 2/4, (5,) 1/4
    likely = drafter(nodes=8, min_probability=0.3).propose([1, 2], 3, budget=20)
    assert paths(likely) == {(4,), (4, 4), (4, 4, 8)}
    assert paths(drafter(nodes=8, min_probability=0.6).propose([1, 2], 3, 20)) == {(4,), (4, 4)}


def test_the_context_continuation_comes_first_and_shares_prefixes():
    context = [3, 4, 7, 7, 1]  # the context continued 3 with 4 7 7
    draft = drafter(nodes=5, max_draft=3).propose(context, 3, budget=20)
    assert paths(draft) == {(4,), (4, 7), (4, 7, 7), (4, 4), (4, 4, 8)}


def test_the_step_budget_and_node_count_bound_the_tree():
    assert drafter(nodes=8).propose([1, 2], 3, budget=2).tree.size == 3
    assert drafter(nodes=2).propose([1, 2], 3, budget=20).tree.size == 3


def test_nothing_known_drafts_the_root_alone():
    assert drafter(nodes=4).propose([1, 2], 6, budget=20).tree.size == 1


def test_settings_beyond_the_sorted_depth_are_refused():
    with pytest.raises(InputError, match="exceeds the datastore's sorted depth 6"):
        RetrievalDrafter(Datastore.build(CORPUS, depth=6), RetrievalConfig(max_ngram=4, length=3))
    with pytest.raises(InputError, match="must all be >= 1"):
        RetrievalConfig(nodes=0)
    with pytest.raises(InputError, match="min-probability must be in"):
        RetrievalConfig(min_probability=1.0)


@pytest.mark.slow
def test_an_engine_carries_its_datastore_and_checks_it(engine_dir, tmp_path):
    import shutil

    engine = leapc.load(engine_dir("bundled"))
    info = engine.manifest.datastore
    assert info.source.endswith("email") and info.documents > 10 and info.tokens > 10_000
    assert engine.datastore.size == info.tokens + info.documents  # one separator per document
    copy = tmp_path / "engine"
    shutil.copytree(engine.path, copy)
    tokens = copy / "datastore" / "tokens.npy"
    np.save(tokens, np.load(tokens)[::-1].copy())
    with pytest.raises(EngineError, match="datastore file datastore/tokens.npy is corrupt"):
        leapc.load(copy)


def test_building_from_a_source_without_text_is_a_user_error(tmp_path):
    from leapc.datastore import read_texts

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no UTF-8 text"):
        read_texts(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        read_texts([tmp_path / "missing"])
    (tmp_path / "a.txt").write_text(json.dumps({"a": 1}))
    assert read_texts(tmp_path)[1] == ['{"a": 1}']
