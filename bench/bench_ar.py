"""Autoregressive decoding: leapc ORT (and eager) vs transformers generate(), same run.

    python bench/bench_ar.py [--max-new-tokens 64] [--repeats 5]

Builds the bundled model's engines under .cache/bench/, times greedy decoding of 20
held-out standard-library prompts on each, and times transformers ``generate()`` on the
same prompts in the same process. Writes bench/results/ar_bundled.{json,md}.
"""

from __future__ import annotations

from pathlib import Path

import typer

import leapc
from leapc.benchmark import BenchConfig, run_bench, save_results
from leapc.models import corpus

ROOT = Path(__file__).resolve().parents[1]


def markdown(results: list[dict]) -> str:
    hf = results[0]["baselines"]["hf_generate_tokens_per_s"]
    lines = ["| engine | policy | tokens/s | tau | vs transformers generate() |",
             "| --- | --- | --- | --- | --- |"]
    for result in results:
        for row in result["results"]:
            lines.append(f"| {result['backend']} | {row['policy']} | {row['tokens_per_s']:.1f} | "
                         f"{row['tau']:.2f} | {row['tokens_per_s'] / hf:.2f}× |")
    lines.append(f"| transformers | generate() greedy | {hf:.1f} | 1.00 | 1.00× |")
    return "\n".join(lines)


def main(max_new_tokens: int = 64, repeats: int = 5, backends: str = "ort,eager") -> None:
    prompts = tuple(corpus.held_out_prompts(20))
    cfg = BenchConfig(("ar",), prompts, max_new_tokens, repeats)
    results = []
    for i, backend in enumerate(backends.split(",")):
        engine_dir = ROOT / ".cache" / "bench" / f"bundled-{backend}"
        if not (engine_dir / "manifest.json").exists():
            leapc.build("bundled", engine_dir, backend)
        # transformers is timed once, in the first backend's run (same process, same prompts)
        results.append(run_bench(leapc.load(engine_dir), cfg, vs_hf=i == 0))
    results[1:] = [r | {"baselines": results[0]["baselines"]} for r in results[1:]]
    save_results(ROOT / "bench" / "results", "ar_bundled", results,
                 f"Bundled model, {len(prompts)} held-out prompts × {max_new_tokens} new tokens, "
                 f"greedy, median of {repeats} (`python bench/bench_ar.py`)", markdown(results))


if __name__ == "__main__":
    typer.run(main)
