"""The decode stats account for every program call: count per program, time inside calls,
and leapc's own share of the time (everything outside them)."""

from __future__ import annotations

import pytest

import leapc

REPEATING = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8]


def _check_time(stats) -> None:
    assert 0.0 < stats.program_s < stats.prefill_s + stats.decode_s
    assert 0.0 < stats.overhead_share < 1.0
    assert stats.overhead_share == pytest.approx(
        1 - stats.program_s / (stats.prefill_s + stats.decode_s))


@pytest.mark.parametrize("policy", ["ar", "lookup"])
def test_every_target_call_is_counted_and_timed(engine_dir, policy):
    stats = leapc.load(engine_dir("tiny-llama")).generate(REPEATING, 40, policy=policy).stats
    # the first token comes from the last prefill call; every later step is one more call
    assert dict(stats.calls) == {"full": stats.prefill_calls + stats.steps - 1}
    assert stats.calls_per_token == pytest.approx(stats.calls["full"] / stats.new_tokens)
    if policy == "lookup":
        assert stats.steps < stats.new_tokens  # drafting paid off: fewer calls than tokens
    _check_time(stats)
    assert stats.as_dict()["calls"] == dict(stats.calls)


@pytest.mark.slow
def test_a_self_drafting_policy_counts_its_own_programs(exit_engine_dir):
    stats = leapc.load(exit_engine_dir("tiny-llama")).generate(REPEATING, 40,
                                                              policy="early-exit").stats
    # early exit drafts with `draft` (a whole chain per `draft_chain` call) and verifies
    # with `remainder`; `full` only prefills
    assert stats.calls["full"] == stats.prefill_calls
    assert stats.calls["remainder"] == stats.steps - 1
    assert stats.calls["draft_chain"] + stats.calls["draft"] >= stats.steps - 1
    assert stats.calls["draft_chain"] > 0
    _check_time(stats)
