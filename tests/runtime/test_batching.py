"""Continuous batching (runtime/batching.py): every request's tokens at batch > 1 are the
ones it gets alone, under any arrival order, for every policy that batches; the batch's
KV rows, masks and padding are as the step contract says."""

from __future__ import annotations

import random

import numpy as np
import pytest
from engines import TRAINING_FREE, record_steps, run_all
from stats import chi2_critical, chi2_homogeneity

import leapc
from leapc.ir.dims import ModelDims
from leapc.ir.errors import InputError
from leapc.runtime.batching import BatchKVCache, RowSlicing
from leapc.runtime.drafters.base import Draft
from leapc.runtime.kv_cache import KVCache

DIMS = ModelDims(num_layers=2, num_kv_heads=1, head_dim=4, hidden_size=8, vocab_size=16,
                 dtype="float32")
# Prompts of different lengths and repetitiveness (the tiny engines take id prompts).
TINY_PROMPTS = ([5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [3], [9, 9, 9, 9], list(range(40, 100)),
                [1, 2, 3, 1, 2, 3, 1, 2], [77, 78], list(range(10, 30)) * 2, [4, 4])


def _joined(lengths: list[int]) -> BatchKVCache:
    """A batch whose row r holds ``lengths[r]`` slots valued r + 1 + slot / 100."""
    batch = BatchKVCache(DIMS, max_seq=64)
    caches = []
    for row, length in enumerate(lengths):
        cache = KVCache(DIMS.num_layers, DIMS.num_kv_heads, DIMS.head_dim, "float32", 64)
        present = np.broadcast_to((row + 1 + np.arange(length) / 100)[:, None],
                                  (2, 2, 1, 1, length, 4)).astype(np.float32)
        cache.commit(present, np.arange(length))
        caches.append(cache)
    batch.rebuild([], caches)
    return batch


def test_batch_inputs_pad_each_row_and_mask_its_own_past():
    batch = _joined([3, 5])
    wide = Draft.chain_of(11, [12, 13])
    tokens, positions, past, mask = batch.inputs([Draft.root_only(10), wide])
    C = batch.capacity
    assert past is batch.buffer and past.shape == (2, 2, 2, 1, C, 4)
    assert tokens.tolist() == [[10, 0, 0], [11, 12, 13]]
    assert positions.tolist() == [[3, 3, 3], [5, 6, 7]]
    # row 0: its 3 valid slots, then itself; its padding nodes see the same past and
    # themselves only, and no real node sees them
    assert mask[0, 0].nonzero()[0].tolist() == [0, 1, 2, C]
    assert mask[0, 1].nonzero()[0].tolist() == [0, 1, 2, C + 1]
    assert mask[0, 2].nonzero()[0].tolist() == [0, 1, 2, C + 2]
    # row 1: 5 valid slots, then the causal chain
    assert [mask[1, n].nonzero()[0].tolist() for n in range(3)] == [
        [0, 1, 2, 3, 4, C], [0, 1, 2, 3, 4, C, C + 1], [0, 1, 2, 3, 4, C, C + 1, C + 2]]


def test_commit_writes_a_rows_accepted_nodes_after_its_own_length():
    batch = _joined([3, 5])
    present = np.zeros((2, 2, 2, 1, 3, 4), np.float32)
    present[:, :, 1, :, :, :] = np.arange(3)[:, None] + 50  # row 1's nodes: 50, 51, 52
    batch.commit(1, present[:, :, 1:2], [0, 2])
    assert batch.lengths == [3, 7]
    assert batch.buffer[0, 0, 1, 0, 5:7, 0].tolist() == [50, 52]
    assert batch.buffer[0, 0, 1, 0, :5, 0].tolist() == pytest.approx([2, 2.01, 2.02, 2.03, 2.04])
    assert batch.buffer[0, 0, 0, 0, :3, 0].tolist() == pytest.approx([1, 1.01, 1.02])


def test_rebuild_keeps_rows_in_order_and_drops_the_others():
    batch = _joined([3, 5, 2])
    batch.rebuild([2, 0], [])
    assert batch.lengths == [2, 3]
    assert batch.buffer[0, 0, :, 0, 0, 0].tolist() == [3, 1]


def test_a_step_wider_than_the_room_left_shrinks_the_capacity():
    batch = _joined([60])
    assert batch.capacity == 64
    _, _, past, mask = batch.inputs([Draft.chain_of(1, [2, 3])])
    assert past.shape[4] == 61 and mask.shape == (1, 3, 64)
    assert batch.buffer[1, 1, 0, 0, 59, 0] == pytest.approx(1.59)  # the slots survive


def test_row_slicing_keeps_the_batch_axis_and_cuts_padding_nodes():
    slicing = RowSlicing.of({"logits": ("B", "N", "16"), "present": ("2", "2", "B", "1", "N", "4"),
                             "head_logits": ("3", "B", "N", "16")})
    out = {"logits": np.zeros((2, 5, 16)), "present": np.zeros((2, 2, 2, 1, 5, 4)),
           "head_logits": np.zeros((3, 2, 5, 16))}
    row = slicing.row(out, 1, 2)
    assert row["logits"].shape == (1, 2, 16)
    assert row["present"].shape == (2, 2, 1, 1, 2, 4)
    assert row["head_logits"].shape == (3, 1, 2, 16)


def run_batched(engine, requests: list[dict], max_batch: int, seed: int = 0,
                cancel: set[int] = frozenset()) -> list[list[int]]:
    """Submit ``requests`` (`Engine.sequence` keywords) at random steps of one scheduler;
    each one's tokens. Requests in ``cancel`` are cancelled after their first tokens."""
    scheduler = engine.scheduler(max_batch)
    sequences = [engine.sequence(**r) for r in requests]
    arrivals, order = random.Random(seed), list(range(len(sequences)))
    while order or not scheduler.idle:
        while order and arrivals.random() < 0.4:
            scheduler.submit(sequences[order.pop(0)])
        for sequence, _ in scheduler.step():
            if sequences.index(sequence) in cancel:
                sequence.cancelled = True
    assert scheduler.cache.rows == 0 and scheduler.occupancy == 0
    return [s.token_ids for s in sequences]


def alone(engine, requests: list[dict]) -> list[list[int]]:
    return [engine.generate(r.pop("prompt"), r.pop("max_new_tokens"), **r).token_ids
            for r in map(dict, requests)]


@pytest.mark.parametrize("policy", TRAINING_FREE)
@pytest.mark.parametrize("max_batch", (1, 3, 8))
def test_every_request_is_token_identical_to_its_run_alone(engine_dir, policy, max_batch):
    engine = leapc.load(engine_dir("tiny-llama"))
    requests = [dict(prompt=p, max_new_tokens=16 + 7 * i, policy=policy)
                for i, p in enumerate(TINY_PROMPTS)]
    expected = alone(engine, requests)
    for seed in range(2):  # two arrival orders
        assert run_batched(engine, requests, max_batch, seed) == expected


def test_rows_near_max_seq_batch_with_short_ones(engine_dir):
    """A row whose past nearly fills max_seq limits the others' drafts, never a step."""
    engine = leapc.load(engine_dir("tiny-llama"))
    long = list(range(1, 240))  # max-seq 256: 16 tokens left, then the context ends
    requests = [dict(prompt=long, max_new_tokens=64, policy="lookup"),
                *(dict(prompt=p, max_new_tokens=40, policy="lookup") for p in TINY_PROMPTS[:3])]
    assert run_batched(engine, requests, 4) == alone(engine, requests)


def test_mixed_policies_and_sampling_rows_are_exact(engine_dir):
    """Sampled rows with seeds draw what they draw alone (each row keeps its streams)."""
    engine = leapc.load(engine_dir("tiny-llama"))
    policies = ("ar", "lookup", "suffix", "recycle")
    requests = [dict(prompt=p, max_new_tokens=24, policy=policies[i % 4],
                     temperature=0.0 if i % 2 else 0.8, top_k=0 if i % 3 else 5, seed=i)
                for i, p in enumerate(TINY_PROMPTS)]
    assert run_batched(engine, requests, 4, seed=3) == alone(engine, requests)


def test_cancelled_requests_free_their_rows_and_leave_the_others_exact(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    requests = [dict(prompt=p, max_new_tokens=32, policy="suffix") for p in TINY_PROMPTS]
    got = run_batched(engine, requests, 4, cancel={1, 4})
    expected = alone(engine, requests)
    for i, (tokens, want) in enumerate(zip(got, expected, strict=True)):
        assert tokens == want if i not in (1, 4) else want[: len(tokens)] == tokens
    assert len(got[1]) < 32 and len(got[4]) < 32


def test_a_batch_wider_than_the_engines_bound_is_refused(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    with pytest.raises(InputError, match=r"max-batch must be in \[1, 8\].*got 9"):
        engine.scheduler(9)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ("draft", "retrieval"))
def test_draft_model_and_retrieval_rows_are_identical_on_the_bundled_model(engine_dir, policy):
    engine = leapc.load(engine_dir("bundled"))
    prompts = ("def add(a, b):\n    return", "import os\n\ndef list_files(path):\n",
               "class Stack:\n    def __init__(self):\n        self.items = []\n", "for i in")
    requests = [dict(prompt=p, max_new_tokens=24 + 8 * i, policy=policy)
                for i, p in enumerate(prompts)]
    assert run_batched(engine, requests, 4) == alone(engine, requests)


@pytest.mark.parametrize("policy", ("medusa", "medusa-dynamic"))
def test_head_policies_batch_with_per_row_head_outputs(heads_engine_dir, policy):
    engine = leapc.load(heads_engine_dir("tiny-llama", "medusa"))
    requests = [dict(prompt=p, max_new_tokens=20, policy=policy) for p in TINY_PROMPTS[:5]]
    assert run_batched(engine, requests, 4) == alone(engine, requests)


def test_a_policy_that_cannot_batch_runs_alone_between_batches(exit_engine_dir):
    engine = leapc.load(exit_engine_dir("tiny-llama"))
    requests = [dict(prompt=p, max_new_tokens=20, policy="early-exit" if i % 2 else "lookup")
                for i, p in enumerate(TINY_PROMPTS[:5])]
    scheduler = engine.scheduler(4)
    sequences = [engine.sequence(**r) for r in requests]
    for sequence in sequences:
        scheduler.submit(sequence)
    while not scheduler.idle:
        scheduler.step()
        running = [*scheduler.running, *scheduler.prefilling]
        assert scheduler.alone is None or not running  # nothing shares its steps
    assert [s.token_ids for s in sequences] == alone(engine, requests)


@pytest.mark.slow
@pytest.mark.shared
def test_lookup_sampling_at_batch_four_matches_plain_sampling(engine_dir):
    """Chi-square homogeneity of the 2nd and 3rd sampled tokens: lookup rows in batches
    of four against plain one-at-a-time sampling (DESIGN §7b)."""
    from test_policy_sampling import PROMPT, SAMPLES, second_and_third_tokens

    engine = leapc.load(engine_dir("stories"))
    plain = second_and_third_tokens(engine, "ar", 1.5, 0)
    batched = []
    for seed0 in range(10**6, 10**6 + SAMPLES, 4):
        scheduler = engine.scheduler(4)
        sequences = [engine.sequence(PROMPT, 3, policy="lookup", temperature=1.5, seed=s)
                     for s in range(seed0, seed0 + 4)]
        run_all(scheduler, sequences)
        batched += [tuple(s.token_ids[1:3]) for s in sequences]
    stat, df = chi2_homogeneity(plain, batched)
    assert df >= 3 and stat < chi2_critical(df), (stat, df)


def test_step_nodes_bound_every_decode_step_and_keep_rows_exact(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    requests = [dict(prompt=p, max_new_tokens=40, policy="suffix") for p in TINY_PROMPTS]
    scheduler = engine.scheduler(4, step_nodes=10)
    widths, _ = record_steps(scheduler)
    sequences = [engine.sequence(**r) for r in requests]
    run_all(scheduler, sequences)
    assert [s.token_ids for s in sequences] == alone(engine, requests)
    assert max(rows * width for rows, width in widths) <= 10
    assert max(width for rows, width in widths if rows == 4) <= 2
    assert max(width for _, width in widths) > 2  # fewer rows draft deeper


def test_step_nodes_below_one_is_refused(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    with pytest.raises(InputError, match="step-nodes must be at least 1"):
        engine.scheduler(4, step_nodes=0)


def test_a_finished_request_frees_its_row_in_the_step_that_finished_it(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    scheduler = engine.scheduler(4)
    sequence = engine.sequence([5, 6, 7], 6)
    scheduler.submit(sequence)
    while sequence.stats.stop_reason is None:
        assert not scheduler.idle
        scheduler.step()
    assert scheduler.idle and scheduler.cache.rows == 0 and len(sequence.token_ids) == 6


def test_a_joining_request_takes_a_finished_ones_row_in_place(engine_dir):
    """Only growing the batch copies it; a request that joins later takes a freed row."""
    engine = leapc.load(engine_dir("tiny-llama"))
    scheduler = engine.scheduler(2)
    grows, rebuild = [], scheduler.cache.rebuild

    def counted(keep, joining):
        grows.extend(joining)
        rebuild(keep, joining)

    scheduler.cache.rebuild = counted
    requests = [dict(prompt=p, max_new_tokens=n)
                for p, n in zip(TINY_PROMPTS[:5], (4, 40, 4, 4, 4), strict=True)]
    sequences = [engine.sequence(**r) for r in requests]
    for sequence in sequences:
        scheduler.submit(sequence)
    while not scheduler.idle:
        scheduler.step()
        assert len(scheduler.rows) <= 2
    assert [s.token_ids for s in sequences] == alone(engine, requests)
    assert len(grows) == 2  # the first two; the other three were placed in freed rows
