"""Lookahead decoding settings against ar (and prompt lookup) on the bundled model.

    python bench/bench_lookahead.py [--settings 3,3,3,5,4,5] [--max-new-tokens 128] [--repeats 3]

The machine is shared, so its load drifts within a run: policies are interleaved prompt
by prompt (each prompt runs under ar, lookup and every setting before the next one), and
each repeat's speedup compares timings taken side by side. Reports the median over
repeats of tokens/s (new tokens over prefill + decode time, summed over the prompt set)
and of the speedup, tau, and whether every output equals ar's. Builds the engine under
.cache/bench/; writes bench/results/lookahead_bundled.{json,md} (``_window_only`` with
--no-pool-context: the pool then holds only the Jacobi window's n-grams).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import typer

import leapc
from leapc.benchmark import load_prompts, save_results
from leapc.runtime.drafters.lookahead import LookaheadConfig
from leapc.runtime.engine import Engine
from leapc.runtime.policies import DraftOptions

ROOT = Path(__file__).resolve().parents[1]
PROMPT_SETS = ("code_heldout", "code_edit")


def one_pass(engine: Engine, prompts: tuple[str, ...], settings: dict[str, dict],
             max_new_tokens: int) -> dict[str, dict]:
    """Every prompt under every policy in turn: tokens, seconds, steps and ids per policy."""
    totals = {name: {"tokens": 0, "seconds": 0.0, "steps": 0, "ids": []} for name in settings}
    for prompt in prompts:
        for name, options in settings.items():
            generation = engine.generate(prompt, max_new_tokens, **options)
            stats, total = generation.stats, totals[name]
            total["tokens"] += stats.new_tokens
            total["seconds"] += stats.prefill_s + stats.decode_s
            total["steps"] += stats.steps
            total["ids"].append(generation.token_ids)
    return totals


def measure(engine: Engine, prompts: tuple[str, ...], settings: dict[str, dict],
            max_new_tokens: int, repeats: int) -> list[dict]:
    one_pass(engine, prompts[:2], settings, 16)  # warm-up
    passes = [one_pass(engine, prompts, settings, max_new_tokens) for _ in range(repeats)]
    rows = []
    for name in settings:
        speeds = [p[name]["tokens"] / p[name]["seconds"] for p in passes]
        speedups = [p["ar"]["seconds"] / p[name]["seconds"] * p[name]["tokens"] / p["ar"]["tokens"]
                    for p in passes]
        last = passes[-1][name]
        rows.append({"policy": name,
                     "tokens_per_s": statistics.median(speeds),
                     "speedup_vs_ar": statistics.median(speedups),
                     "tau": last["tokens"] / last["steps"],
                     "identical_to_ar": last["ids"] == passes[-1]["ar"]["ids"]})
    return rows


def markdown(results: dict[str, list[dict]]) -> str:
    lines = ["| prompts | policy | tokens/s | tau | speedup vs ar | identical to ar |",
             "| --- | --- | --- | --- | --- | --- |"]
    for prompt_set, rows in results.items():
        for row in rows:
            lines.append(f"| {prompt_set} | {row['policy']} | {row['tokens_per_s']:.1f} | "
                         f"{row['tau']:.2f} | {row['speedup_vs_ar']:.2f}× | "
                         f"{'yes' if row['identical_to_ar'] else 'NO'} |")
    return "\n".join(lines)


def main(settings: str = "3,3,3,5,4,5", max_new_tokens: int = 128, repeats: int = 3,
         pool_context: bool = True) -> None:
    numbers = [int(n) for n in settings.split(",")]
    configs = [LookaheadConfig(*numbers[i : i + 3], pool_context=pool_context)
               for i in range(0, len(numbers), 3)]
    suffix = "" if pool_context else " (window only)"
    policies = {"ar": {}, "lookup": {"policy": "lookup"}} | {
        f"lookahead {c}{suffix}": {"policy": "lookahead", "draft": DraftOptions(lookahead=c)}
        for c in configs}
    engine_dir = ROOT / ".cache" / "bench" / "bundled-ort"
    if not (engine_dir / "manifest.json").exists():
        leapc.build("bundled", engine_dir, "ort")
    engine = leapc.load(engine_dir)
    results = {name: measure(engine, load_prompts(ROOT / "bench" / "prompts" / f"{name}.jsonl"),
                             policies, max_new_tokens, repeats)
               for name in PROMPT_SETS}
    stem = "lookahead_bundled" + ("" if pool_context else "_window_only")
    save_results(ROOT / "bench" / "results", stem, results,
                 f"Bundled model, ORT, greedy, {max_new_tokens} new tokens, policies interleaved "
                 f"prompt by prompt, median of {repeats} (`python bench/bench_lookahead.py "
                 f"--settings {settings}{'' if pool_context else ' --no-pool-context'}`)",
                 markdown(results))


if __name__ == "__main__":
    typer.run(main)
