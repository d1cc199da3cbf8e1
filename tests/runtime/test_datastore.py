"""The retrieval datastore: suffix-array lookups and continuation counts against brute force."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leapc.ir.errors import EngineError
from leapc.runtime.datastore import SUFFIXES_FILE, Datastore

documents = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=30), min_size=1, max_size=5)


def brute_occurrences(docs: list[list[int]], ngram: list[int]) -> list[tuple[int, int]]:
    """(document, start) of every occurrence, never across a document boundary."""
    n = len(ngram)
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - n + 1)
            if doc[i : i + n] == ngram]


def brute_prefix_counts(docs, ngram, length) -> Counter:
    counts = Counter()
    for d, i in brute_occurrences(docs, ngram):
        follow = docs[d][i + len(ngram) : i + len(ngram) + length]
        for k in range(1, len(follow) + 1):
            counts[tuple(follow[:k])] += 1
    return counts


@settings(max_examples=150, deadline=None)
@given(docs=documents, ngram=st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_occurrences_are_one_range_of_exactly_the_brute_force_matches(docs, ngram):
    store = Datastore.build(docs, depth=6)
    lo, hi = store.occurrences(np.asarray(ngram))
    assert hi - lo == len(brute_occurrences(docs, ngram))
    for start in store.suffixes[lo:hi]:
        assert store.tokens[start : start + len(ngram)].tolist() == ngram


@settings(max_examples=150, deadline=None)
@given(docs=documents, suffix=st.lists(st.integers(0, 4), min_size=1, max_size=3),
       nodes=st.integers(1, 12))
def test_continuations_are_the_most_frequent_prefixes_counted_within_documents(docs, suffix, nodes):
    store = Datastore.build(docs, depth=6)
    found = store.continuations(np.asarray(suffix), max_ngram=3, length=3, nodes=nodes)
    if found.ngram == 0:  # not even the last token occurs
        assert not brute_occurrences(docs, suffix[-1:])
        return
    matched = suffix[len(suffix) - found.ngram :]
    longer = suffix[len(suffix) - found.ngram - 1 :]
    assert brute_occurrences(docs, matched)
    assert found.ngram == len(suffix) or not brute_occurrences(docs, longer)  # longest match
    expected = brute_prefix_counts(docs, matched, 3)
    assert [expected[p] for p in found.paths] == found.counts  # counts are exact (few samples)
    assert found.counts == sorted(found.counts, reverse=True)
    assert len(found.paths) == min(nodes, len(expected))
    if len(found.paths) < len(expected):  # nothing left out was more frequent
        assert max(c for p, c in expected.items() if p not in found.paths) <= found.counts[-1]
    for path in found.paths:  # prefix-closed: every parent is in, and comes first
        if len(path) > 1:
            assert found.paths.index(path[:-1]) < found.paths.index(path)


def test_a_short_suffix_seen_often_beats_a_long_one_seen_rarely():
    docs = [[1, 2, 3, 9]] + [[5, 3, 4]] * 30  # (2, 3) once, then 9; (3,) 31 times, mostly 4
    store = Datastore.build(docs, depth=6)
    context = np.asarray([7, 2, 3])
    assert store.continuations(context, 3, 1, 1).paths == [(9,)]
    backed_off = store.continuations(context, 3, 1, 1, min_occurrences=20)
    assert (backed_off.ngram, backed_off.occurrences, backed_off.paths) == (1, 31, [(4,)])


def test_sampling_keeps_frequencies_of_a_large_range():
    docs = [[1, 2]] * 300 + [[1, 3]] * 100
    found = Datastore.build(docs, depth=4).continuations(np.asarray([1]), 1, 1, 2, samples=40)
    assert found.occurrences == 400
    assert found.paths == [(2,), (3,)] and found.counts == [30, 10]


def test_save_and_load_round_trip_and_a_truncated_store_is_refused(tmp_path):
    store = Datastore.build([[1, 2, 3], [2, 3, 4]], depth=4)
    store.save(tmp_path)
    loaded = Datastore.load(tmp_path, depth=4)
    assert loaded.tokens.tolist() == store.tokens.tolist()
    assert loaded.suffixes.tolist() == store.suffixes.tolist()
    np.save(tmp_path / SUFFIXES_FILE, store.suffixes[:-1])
    with pytest.raises(EngineError, match="disagree on the corpus length"):
        Datastore.load(tmp_path, depth=4)
