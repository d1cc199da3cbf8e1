"""Verify-step latency: dense-mask SDPA vs ``leapc.tree_attention``, per backend.

    LEAPC_THREADS=1 python bench/bench_tree_attention.py [--calls 10] [--rounds 20]
        [--backends ort,eager] [--results tree_attention]

Builds the bundled model's engines with both attention lowerings under
.cache/bench/tree-attention/, then times one step call verifying a tree of N nodes
(a heap-shaped tree: node i's parent is (i - 1) // 2) against a cache holding ``past``
committed tokens, with the inputs the runtime builds (`runtime.decode.tree_inputs`).
Dense and tree calls alternate in rounds, so load from other processes hits both alike;
each number is the median over all calls. Writes bench/results/<results>.{json,md}.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import typer

import leapc
from leapc.benchmark import save_results
from leapc.ir.tree import tree_from_parents
from leapc.runtime.decode import tree_inputs
from leapc.runtime.drafters.base import Draft
from leapc.runtime.policies import new_cache

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / ".cache" / "bench" / "tree-attention"
LOWERINGS = ("dense", "tree")


def engine(backend: str, attention: str) -> leapc.Engine:
    path = ENGINES / f"{backend}-{attention}"
    if not (path / "manifest.json").exists():
        leapc.build("bundled", path, backend, attention=attention)
    return leapc.load(path)


def verify_inputs(manifest, past: int, new: int, seed: int = 0):
    """Step inputs for a ``new``-node tree over ``past`` committed tokens, as the runtime
    builds them (block-allocated cache, so T is the cache capacity, not ``past``)."""
    rng = np.random.default_rng(seed)
    m = manifest.model.dims
    cache = new_cache(m, manifest.max_seq)
    rows = rng.standard_normal((m.num_layers, 2, 1, m.num_kv_heads, past, m.head_dim))
    cache.commit(rows.astype(m.dtype), np.arange(past))
    tree = tree_from_parents([-1, *((i - 1) // 2 for i in range(1, new))])
    tokens = rng.integers(0, m.vocab_size, new)
    return tree_inputs(cache, Draft(tokens, tree))


def time_calls(step, inputs, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - start)
    return times


def compare(engines: dict, past: int, new: int, calls: int, rounds: int) -> dict:
    inputs = verify_inputs(engines["dense"].manifest, past, new)
    outputs = {a: e.step(*inputs) for a, e in engines.items()}  # also warms up
    for e in engines.values():
        time_calls(e.step, inputs, 3)
    times = {a: [] for a in engines}
    for _ in range(rounds):
        for attention, e in engines.items():
            times[attention] += time_calls(e.step, inputs, calls)
    ms = {a: 1e3 * statistics.median(t) for a, t in times.items()}
    diff = np.abs(outputs["dense"]["logits"] - outputs["tree"]["logits"]).max()
    return {"past": past, "T": int(inputs[2].shape[4]), "N": new,
            "dense_ms": ms["dense"], "tree_ms": ms["tree"],
            "speedup": ms["dense"] / ms["tree"], "max_logit_diff": float(diff)}


def markdown(rows: list[dict]) -> str:
    lines = ["| backend | past | T | N | dense ms | tree ms | dense / tree |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['backend']} | {r['past']} | {r['T']} | {r['N']} | {r['dense_ms']:.2f} | "
              f"{r['tree_ms']:.2f} | {r['speedup']:.2f}× |" for r in rows]
    return "\n".join(lines)


def main(backends: str = "ort,eager", pasts: str = "64,990", sizes: str = "1,8,32",
         calls: int = 10, rounds: int = 20, results: str = "tree_attention") -> None:
    threads = int(os.environ.get("LEAPC_THREADS", "0")) or os.cpu_count()
    rows = []
    for backend in backends.split(","):
        if backend in ("eager", "aoti"):  # torch's thread pool runs both
            import torch

            torch.set_num_threads(threads)
        engines = {a: engine(backend, a) for a in LOWERINGS}
        for past in map(int, pasts.split(",")):
            for new in map(int, sizes.split(",")):
                rows.append({"backend": backend} | compare(engines, past, new, calls, rounds))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    setup = {"threads": threads, "calls": calls * rounds, "machine": platform.processor()
             or platform.machine(), "cpus": os.cpu_count()}
    save_results(ROOT / "bench" / "results", results, {"setup": setup, "rows": rows},
                 f"Bundled model (12 layers, 10 query / 2 KV heads), one verify step, median of "
                 f"{calls * rounds} calls, {threads} thread(s), dense and tree calls interleaved "
                 f"(`python bench/bench_tree_attention.py`). T is the cache capacity the runtime "
                 f"passes; the long case is the longest past that leaves room for N = 32 under "
                 f"max-seq 1024.", markdown(rows))


if __name__ == "__main__":
    typer.run(main)
