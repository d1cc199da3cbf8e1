"""Autoregressive decoding of the bundled model on each backend: ort vs aoti vs eager.

    python bench/bench_backends.py [--backends ort,aoti,eager] [--threads 2] [--repeats 5]

Builds the bundled model's engine on each backend (its default attention lowering) under
.cache/bench/backends/ once, timing the build; then times greedy decoding of 20 held-out
stdlib prompts on every engine, the backends interleaved within each repeat so load from
other processes hits them alike, and reports median tokens/s and whether every backend
emitted the first one's tokens. Writes bench/results/backends_bundled.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import typer

import leapc
from leapc.benchmark import save_results
from leapc.models import corpus

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / ".cache" / "bench" / "backends"
BUILD_TIMES = ENGINES / "build_seconds.json"  # written when an engine is (re)built


def engine(backend: str) -> leapc.Engine:
    path = ENGINES / backend
    if not (path / "manifest.json").exists():
        start = time.perf_counter()
        leapc.build("bundled", path, backend)
        times = json.loads(BUILD_TIMES.read_text()) if BUILD_TIMES.exists() else {}
        BUILD_TIMES.write_text(json.dumps(times | {backend: time.perf_counter() - start}))
    return leapc.load(path)


def one_pass(engine: leapc.Engine, prompts: tuple[str, ...], max_new: int):
    """Greedy generations of every prompt, and their tokens/s (prefill + decode time)."""
    gens = [engine.generate(p, max_new) for p in prompts]
    seconds = sum(g.stats.prefill_s + g.stats.decode_s for g in gens)
    return [g.token_ids for g in gens], sum(len(g.token_ids) for g in gens) / seconds


def set_threads(threads: int) -> None:
    """ORT engines read LEAPC_THREADS when loaded; torch's pool (eager, aoti) is global."""
    import torch

    os.environ["LEAPC_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def row(backend: str, engine: leapc.Engine, speeds: list[float], same: bool) -> dict:
    build = json.loads(BUILD_TIMES.read_text()).get(backend) if BUILD_TIMES.exists() else None
    full = engine.path / engine.manifest.programs["full"].file
    attention = "tree" if "insert_tree_attention" in engine.manifest.passes else "dense"
    return {"backend": backend, "attention": attention, "tokens_per_s": statistics.median(speeds),
            "speeds": speeds, "identical_to_first": same, "build_s": build,
            "program_mb": full.stat().st_size / 2**20}


def markdown(rows: list[dict]) -> str:
    base = rows[0]
    lines = [f"| backend | attention | tokens/s | vs {base['backend']} | identical tokens | "
             "build s | program MB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        build = f"{r['build_s']:.0f}" if r["build_s"] is not None else "?"
        lines.append(f"| {r['backend']} | {r['attention']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× | "
                     f"{'yes' if r['identical_to_first'] else 'NO'} | {build} | "
                     f"{r['program_mb']:.0f} |")
    return "\n".join(lines)


def main(backends: str = "ort,aoti,eager", threads: int = 2, max_new_tokens: int = 64,
         repeats: int = 5) -> None:
    ENGINES.mkdir(parents=True, exist_ok=True)
    set_threads(threads)
    prompts = tuple(corpus.held_out_prompts(20))
    engines = {b: engine(b) for b in backends.split(",")}
    for e in engines.values():
        one_pass(e, prompts[:2], max_new_tokens)  # warm-up
    outputs, speeds = {}, {b: [] for b in engines}
    for _ in range(repeats):
        for backend, e in engines.items():
            outputs[backend], tps = one_pass(e, prompts, max_new_tokens)
            speeds[backend].append(tps)
    first = next(iter(outputs.values()))
    rows = [row(b, e, speeds[b], outputs[b] == first) for b, e in engines.items()]
    setup = {"date": date.today().isoformat(), "threads": threads, "cpus": os.cpu_count(),
             "machine": platform.processor() or platform.machine(), "prompts": len(prompts),
             "max_new_tokens": max_new_tokens, "repeats": repeats}
    save_results(ROOT / "bench" / "results", "backends_bundled", {"setup": setup, "rows": rows},
                 f"Bundled model, {len(prompts)} held-out prompts × {max_new_tokens} new tokens, "
                 f"greedy `ar`, {threads} threads, median of {repeats} interleaved repeats, "
                 f"{setup['date']}, {setup['cpus']}-core CPU (`python bench/bench_backends.py`)",
                 markdown(rows))


if __name__ == "__main__":
    typer.run(main)
