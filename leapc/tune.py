"""`leapc build --tune`: measure an engine's policies on this machine and record the fastest.

Which policy decodes fastest depends on the engine (its programs, its precision), the
machine (a verify step's cost against a one-token step's) and the text (how often drafts
are right), so it is measured, not assumed: every policy the engine offers runs greedy
on calibration prompts, interleaved with ``ar`` in the same run (`leapc.benchmark`), and
``--policy auto`` then runs the fastest configuration whose tokens equal ``ar``'s. Chain
drafters whose default length is not measured at build time (prompt lookup, the draft
model) also run at shorter chains; early exit and layer skip already chose theirs.
"""

from __future__ import annotations

from pathlib import Path

from leapc.benchmark import CODE_PROMPTS, BenchConfig, PolicyRun, run_bench
from leapc.runtime.backends.base import thread_count
from leapc.runtime.engine import Engine
from leapc.runtime.manifest import TunedRun, Tuning
from leapc.runtime.policies import DraftOptions, Policy

# As long as the benchmark's generations: drafters that draw on the text generated so far
# (suffix, lookup) gain with length. At 64 tokens lookup@5 edged out suffix on the bundled
# int8 engine (1402 vs 1369 tok/s), and at 128 suffix was 1.2x faster than it.
TUNE_MAX_NEW = 128
TUNE_REPEATS = 3
# Extra chain lengths for the chain drafters whose default (DEFAULT_MAX_DRAFT) is a guess.
SHORTER_CHAINS = {Policy.LOOKUP: (3, 5), Policy.DRAFT: (3, 5)}


def candidates(engine: Engine) -> tuple[PolicyRun, ...]:
    """Every offered policy at its defaults, and the shorter chains, ``ar`` first."""
    runs = [PolicyRun(p.value, p.value) for p in engine.manifest.policies if p is not Policy.AR]
    for policy, lengths in SHORTER_CHAINS.items():
        if policy in engine.manifest.policies:
            runs += [PolicyRun(f"{policy.value}@{n}", policy.value, DraftOptions(max_draft=n))
                     for n in lengths]
    return tuple(runs)


def measure(engine: Engine, prompts: tuple[str, ...] = CODE_PROMPTS,
            max_new_tokens: int = TUNE_MAX_NEW, repeats: int = TUNE_REPEATS) -> Tuning:
    """The tuning table of ``engine`` on ``prompts`` (same run, medians of ``repeats``)."""
    config = BenchConfig(policies=("ar",), prompts=prompts, max_new_tokens=max_new_tokens,
                         repeats=repeats, variants=candidates(engine))
    rows = {row["policy"]: row for row in run_bench(engine, config)["results"]}
    table = tuple(
        TunedRun(policy=Policy(run.policy), max_draft=run.draft.max_draft,
                 tokens_per_s=rows[run.label]["tokens_per_s"], tau=rows[run.label]["tau"],
                 identical_to_ar=rows[run.label]["identical_to_ar"])
        for run in config.runs())
    lossless = [i for i, run in enumerate(table) if run.identical_to_ar]
    choice = max(lossless, key=lambda i: table[i].tokens_per_s)  # ``ar`` is always there
    return Tuning(prompts=len(prompts), max_new_tokens=max_new_tokens, repeats=repeats,
                  threads=thread_count(), table=table, choice=choice)


def tune(engine_dir: Path, prompts: tuple[str, ...] = CODE_PROMPTS) -> Tuning:
    """Measure the engine in ``engine_dir`` and record the table in its manifest."""
    engine = Engine.load(engine_dir)
    tuning = measure(engine, prompts)
    tuned = {**engine.manifest.model_dump(), "tuning": tuning.model_dump()}
    type(engine.manifest).model_validate(tuned).write(engine_dir)
    return tuning
