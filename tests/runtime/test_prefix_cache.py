"""Prefix caching (runtime/prefix_cache.py): a request reuses the KV of whole blocks of
an earlier prompt, bit for bit, and prefills only the rest; its tokens are the ones it
gets alone; memory stays within the budget, least recently used blocks first; engines
that do not verify exactly refuse it."""

from __future__ import annotations

import numpy as np
import pytest
from engines import record_steps, run_all

import leapc
from leapc.ir.errors import InputError
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.manifest import Attention, Quantization
from leapc.runtime.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 1, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4


def _cache(prompt: list[int]) -> KVCache:
    """A one-row cache whose slot s holds the value prompt[s] + s / 1000 (a stand-in for
    the KV a prefill would write: a function of the tokens up to s)."""
    cache = KVCache(LAYERS, HEADS, DIM, "float32", 256)
    values = np.asarray(prompt) + np.arange(len(prompt)) / 1000
    rows = np.broadcast_to(values[:, None], (LAYERS, 2, 1, HEADS, len(prompt), DIM))
    cache.commit(rows.astype(np.float32), np.arange(len(prompt)))
    return cache


def _empty() -> KVCache:
    return KVCache(LAYERS, HEADS, DIM, "float32", 256)


def test_reuse_writes_the_stored_blocks_bit_for_bit_and_leaves_the_last_token():
    prefixes = PrefixCache(1 << 20, block=4)
    prompt = list(range(10, 20))  # two whole blocks and two tokens
    prefixes.store(prompt, _cache(prompt))
    target = _empty()
    assert prefixes.reuse(prompt + [7, 8], target) == 8
    assert target.length == 8
    assert np.array_equal(target.buffer[..., :8, :], _cache(prompt).buffer[..., :8, :])
    # the same prompt again: its last token must be fed (its logits), so 8, not 10
    assert prefixes.reuse(prompt[:8], _empty()) == 4
    assert prefixes.stats.reused == 12 and prefixes.stats.queried == 20


def test_only_a_run_of_whole_blocks_from_the_start_matches():
    prefixes = PrefixCache(1 << 20, block=4)
    prefixes.store([1, 2, 3, 4, 5, 6, 7, 8, 9], _cache([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert prefixes.reuse([1, 2, 3, 4, 5, 6, 0, 8, 9], _empty()) == 4  # second block differs
    assert prefixes.reuse([0, 2, 3, 4, 5, 6, 7, 8, 9], _empty()) == 0
    assert prefixes.reuse([1, 2, 3, 4], _empty()) == 0  # the last token is always prefilled


def test_prompts_that_share_a_prefix_share_its_blocks():
    prefixes = PrefixCache(1 << 20, block=4)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9]
    prefixes.store(a, _cache(a))
    prefixes.store(b, _cache(b))
    assert prefixes.bytes == 3 * 4 * TOKEN_BYTES  # [1..4] once, then one block each
    assert prefixes.reuse(b + [0], _empty()) == 8


def test_the_least_recently_used_blocks_go_first_within_the_budget():
    prefixes = PrefixCache(4 * 4 * TOKEN_BYTES, block=4)  # four blocks
    a, b, c = [1] * 8, [2] * 8, [3] * 8
    prefixes.store(a, _cache(a))
    prefixes.store(b, _cache(b))
    prefixes.reuse(a + [0], _empty())  # a is now more recent than b
    prefixes.store(c, _cache(c))  # six blocks: b's two go
    assert prefixes.bytes == 4 * 4 * TOKEN_BYTES
    assert prefixes.reuse(b + [0], _empty()) == 0
    assert prefixes.reuse(a + [0], _empty()) == 8
    assert prefixes.reuse(c + [0], _empty()) == 8


def test_eviction_takes_a_prompts_last_block_before_its_first():
    prefixes = PrefixCache(3 * 4 * TOKEN_BYTES, block=4)
    a = list(range(16))  # four blocks in a budget of three
    prefixes.store(a, _cache(a))
    assert prefixes.reuse(a + [0], _empty()) == 12


def _shared_prefix_requests() -> list[dict]:
    head = list(range(30, 70))  # 40 tokens: two whole blocks of 16 shared
    tails = ([5, 6, 7], [9], list(range(100, 120)), [])
    return [dict(prompt=head + tail, max_new_tokens=24, policy=policy)
            for tail in tails for policy in ("ar", "suffix")]


def test_requests_that_reuse_a_prefix_emit_what_they_emit_alone(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    requests = _shared_prefix_requests()
    expected = [engine.generate(r["prompt"], r["max_new_tokens"], policy=r["policy"]).token_ids
                for r in requests]
    scheduler = engine.scheduler(3, prefix_cache_bytes=1 << 20)
    _, prefilled = record_steps(scheduler)
    sequences = [engine.sequence(**r) for r in requests]
    run_all(scheduler, sequences)
    assert [s.token_ids for s in sequences] == expected
    cached = [s.stats.cached_prompt_tokens for s in sequences]
    # the first three start together, with nothing stored; the rest find the shared head
    assert cached[:3] == [0, 0, 0] and all(c >= 32 for c in cached[3:])
    assert sum(prefilled) == sum(len(r["prompt"]) for r in requests) - sum(cached)


def test_an_engine_that_does_not_verify_exactly_refuses_a_prefix_cache(engine_dir):
    engine = leapc.load(engine_dir("tiny-llama"))
    engine.manifest = engine.manifest.model_copy(update={"quantization": Quantization.INT8_NBITS,
                                                         "attention": Attention.TREE})
    with pytest.raises(InputError, match="prefix cache reuses KV rows computed in steps of "
                                         "other widths, so this engine needs float weights"):
        engine.scheduler(2, prefix_cache_bytes=1 << 20)
