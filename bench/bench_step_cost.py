"""Step cost profile: what one call of each program costs at width N and past length T.

    python bench/bench_step_cost.py [--engines ort,ort-int8,ort-bf16,eager]
                                    [--widths 1,2,4,8,16,32]
                                    [--pasts 0,256,896] [--repeats 40]

A verify step of N nodes after T committed tokens is the unit every policy's speed is made
of: a drafting policy wins only if a step of N nodes costs much less than N steps of one.
For each engine of the bundled model (built once under .cache/bench/) this times, per
program, a call at every (N, T): its inputs are built exactly as the decode loop builds
them (`decode.tree_inputs`, a chain draft), so the time is the engine's plus the binding's
(numpy in, numpy out), not leapc's loop. The loop's own share is the decode stats'
`overhead_share` (bench `ar` rows): time outside program calls over decode time.

Writes bench/results/step_cost_bundled.{json,md}: medians (ms) and N=k / N=1 ratios.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import typer

import leapc
from leapc.benchmark import BenchConfig, run_bench, save_results
from leapc.models import corpus
from leapc.runtime.decode import tree_inputs
from leapc.runtime.drafters.base import Draft
from leapc.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
# name -> leapc.build options for the bundled model
ENGINES = {
    "ort": {"backend": "ort"},
    "ort-int8": {"backend": "ort", "quantize": "int8"},  # leapc's kernels: int8 GEMMs, attention
    "ort-int8-nbits": {"backend": "ort", "quantize": "int8-nbits"},
    "ort-bf16": {"backend": "ort", "quantize": "bf16"},  # leapc's kernels, bfloat16 weights
    "eager": {"backend": "eager"},
    "aoti": {"backend": "aoti"},
}


def engine_dir(name: str) -> Path:
    out = ROOT / ".cache" / "bench" / f"bundled-{name}"
    if not (out / "manifest.json").exists():
        options = dict(ENGINES[name])
        leapc.build("bundled", out, options.pop("backend"), **options)
    return out


def call_ms(engine: Engine, program: str, width: int, past: int, repeats: int) -> float:
    """Median wall time (ms) of one ``program`` call verifying a chain of ``width`` nodes
    after ``past`` committed tokens (random KV rows: the cost does not depend on them)."""
    step = engine.program(program)
    cache = engine.new_cache()
    rng = np.random.default_rng(0)
    if past:
        dims = engine.manifest.model.dims
        rows = rng.standard_normal((dims.num_layers, 2, 1, dims.num_kv_heads, past,
                                    dims.head_dim)).astype(cache.dtype)
        cache.commit(rows, np.arange(past))
    tokens = rng.integers(0, engine.manifest.model.dims.vocab_size, width).tolist()
    inputs = tree_inputs(cache, Draft.chain_of(tokens[0], tokens[1:]))
    for _ in range(3):  # warm-up: first calls allocate
        step(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def profile(name: str, widths: list[int], pasts: list[int], repeats: int) -> dict:
    engine = leapc.load(engine_dir(name))
    max_seq, chunk = engine.manifest.max_seq, engine.manifest.max_new
    table = {}
    for past in pasts:
        for width in widths:
            if width <= chunk and past + width <= max_seq:
                table[f"{width}@{past}"] = call_ms(engine, "full", width, past, repeats)
    prompts = tuple(corpus.held_out_prompts(8))
    ar = run_bench(engine, BenchConfig(("ar",), prompts, 128, 3), vs_hf=False)["results"][0]
    return {"engine": name, "widths": widths, "pasts": pasts, "full_ms": table,
            "ar_tokens_per_s": ar["tokens_per_s"], "ar_overhead_share": ar["overhead_share"]}


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        widths, table = result["widths"], result["full_ms"]
        lines += [f"**{result['engine']}** (`full` program; ms per call, ratio to N=1 at the "
                  f"same past; `ar` {result['ar_tokens_per_s']:.0f} tok/s, loop overhead "
                  f"{100 * result['ar_overhead_share']:.0f}% of decode time)", "",
                  "| past T | " + " | ".join(f"N={w}" for w in widths) + " |",
                  "| --- |" + " --- |" * len(widths)]
        for past in result["pasts"]:
            one = table.get(f"1@{past}")
            cells = [f"{table[f'{w}@{past}']:.2f} ({table[f'{w}@{past}'] / one:.2f}×)"
                     if f"{w}@{past}" in table else "" for w in widths]
            lines.append(f"| {past} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(engines: str = "ort,ort-int8,ort-bf16,eager", widths: str = "1,2,4,8,16,32",
         pasts: str = "0,256,896", repeats: int = 40) -> None:
    width_list = [int(w) for w in widths.split(",")]
    past_list = [int(p) for p in pasts.split(",")]
    results = [profile(name, width_list, past_list, repeats) for name in engines.split(",")]
    save_results(ROOT / "bench" / "results", "step_cost_bundled", results,
                 f"Bundled model, step cost by width N and past T, median of {repeats} calls; "
                 "`ar`: 8 held-out prompts × 128 tokens, median of 3 "
                 "(`python bench/bench_step_cost.py`)", markdown(results))


if __name__ == "__main__":
    typer.run(main)
