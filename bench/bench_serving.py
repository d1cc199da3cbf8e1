"""Load test of `leapc serve` on loopback: many concurrent mixed requests, at batch
sizes 1, 4 and 8, with plain decoding and with speculation.

    python bench/bench_serving.py [--requests 200] [--disconnect 0.1] [--quantize int8]
                                  [--step-nodes 16] [--prefix-cache-mb 256]

The server is `leapc serve` in a process of its own (as deployed: the load generator's
Python does not share its interpreter lock), on the bundled model's engine (built once
under .cache/bench/). For each batch size and policy set a fresh server gets
the same requests, all at once: greedy, a held-out prompt, a length from 16 to 128
tokens, a policy from the set; half of them stream, and a share of the streamed ones
disconnect after their first event. Checked: no server error (5xx, dropped connection),
every completed reply identical to the engine's own generation of that request alone,
and nothing running, waiting or holding KV rows afterwards (``/metrics``). Reported:
throughput (completion tokens per second of wall time) and p50 / p99 latency
(submission to last byte); the B = 1 ``ar`` row is one request at a time. Every
configuration runs without a prefix cache and with one: the requests draw from a few
prompts, so with it most of them prefill only their prompt's last tokens.

Writes bench/results/serving_bundled.{json,md}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import typer

import leapc
from leapc.benchmark import save_results
from leapc.models import corpus

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pycoder"
# Each row's policy set: plain decoding, and the training-free lossless drafters.
POLICY_SETS = {"ar": ("ar",), "speculative": ("lookup", "suffix", "recycle")}
BATCHES = (1, 4, 8)
LENGTHS = (16, 32, 64, 128)


def engine_dir(quantize: str) -> Path:
    out = ROOT / ".cache" / "bench" / f"bundled-serve-{quantize}-b{max(BATCHES)}"
    if not (out / "manifest.json").exists():
        leapc.build("bundled", out, "ort", quantize=quantize, max_batch=max(BATCHES))
    return out


async def one(client: httpx.AsyncClient, url: str, request: dict, disconnect: bool) -> dict:
    """Send ``request``; its status, text (None when it disconnected) and latency."""
    start = time.perf_counter()
    if not request["stream"]:
        reply = await client.post(f"{url}/v1/completions", json=request)
        text = reply.json()["choices"][0]["text"] if reply.status_code == 200 else None
        return {"status": reply.status_code, "text": text,
                "seconds": time.perf_counter() - start}
    parts = []
    async with client.stream("POST", f"{url}/v1/completions", json=request) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            parts.extend(c["text"] for c in event["choices"])
            if disconnect:
                break
        status = reply.status_code
    return {"status": status, "text": None if disconnect else "".join(parts),
            "seconds": time.perf_counter() - start}


async def load(url: str, requests: list[dict], disconnects: list[bool]) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(one(client, url, r, d)
                                         for r, d in zip(requests, disconnects, strict=True)),
                                       return_exceptions=True)
        return replies, time.perf_counter() - start


@contextlib.contextmanager
def serving_process(engine: Path, max_queue: int, max_batch: int, step_nodes: int | None,
                    prefix_cache_mb: int) -> Iterator[str]:
    """``leapc serve`` on a free loopback port until the block ends; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "leapc"), "serve", str(engine), "--port", str(port),
               "--model-name", MODEL, "--policy", "ar", "--max-queue", str(max_queue),
               "--max-batch", str(max_batch), "--prefix-cache-mb", str(prefix_cache_mb)]
    server = subprocess.Popen(command + (["--step-nodes", str(step_nodes)] if step_nodes else []))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def settles(url: str, within_s: float = 10.0) -> bool:
    """Whether nothing runs, waits or holds KV rows within ``within_s``: a client that
    disconnected is done at once, while the server stops its generation at the next
    step after it notices (and at B = 1 the server may be generating it when the load
    ends)."""
    deadline = time.monotonic() + within_s
    while True:
        gauges = httpx.get(f"{url}/metrics").text
        if all(f"leapc_{g} 0.0" in gauges
               for g in ("requests_running", "requests_waiting", "batch_rows")):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def run_config(engine, shapes, cut, expected, prompts, policies: tuple[str, ...],
               max_batch: int, step_nodes: int | None, prefix_cache_mb: int,
               rng: random.Random) -> dict:
    """One server, one batch size and policy set; the load test's numbers."""
    bodies = [{"model": MODEL, "prompt": prompts[p], "max_tokens": n, "temperature": 0,
               "stream": stream, "leapc": {"policy": rng.choice(policies)}}
              for p, n, stream in shapes]
    with serving_process(engine.path, len(shapes), max_batch, step_nodes,
                         prefix_cache_mb) as url:
        replies, wall = asyncio.run(load(url, bodies, cut))
        idle = settles(url)
    failures = [r for r in replies if isinstance(r, BaseException) or r["status"] != 200]
    done = [(shape, r) for shape, r in zip(shapes, replies, strict=True)
            if not isinstance(r, BaseException) and r["text"] is not None]
    wrong = sum(r["text"] != expected[(p, n)].text for (p, n, _), r in done)
    tokens = sum(len(expected[(p, n)].token_ids) for (p, n, _), _ in done)
    latencies = sorted(r["seconds"] for _, r in done)
    return {"batch": max_batch, "policies": policies, "prefix_cache_mb": prefix_cache_mb,
            "completed": len(done),
            "server_errors": len(failures), "not_identical": wrong, "idle_after": idle,
            "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main(requests: int = 200, disconnect: float = 0.1, quantize: str = "int8",
         step_nodes: int = None, prefix_cache_mb: int = 256, seed: int = 0) -> None:
    engine = leapc.load(engine_dir(quantize))
    prompts = corpus.held_out_prompts(8)
    rng = random.Random(seed)
    shapes = [(rng.randrange(len(prompts)), rng.choice(LENGTHS), rng.random() < 0.5)
              for _ in range(requests)]
    expected = {(p, n): engine.generate(prompts[p], n, token_healing=True)  # the server's default
                for p, n, _ in shapes}
    cut = [stream and rng.random() < 2 * disconnect for _, _, stream in shapes]
    rows = [run_config(engine, shapes, cut, expected, prompts, policies, batch, step_nodes,
                       cache_mb, random.Random(seed))
            for cache_mb in (0, prefix_cache_mb) for batch in BATCHES
            for policies in POLICY_SETS.values()]
    one_at_a_time = rows[0]["tokens_per_s"]  # B = 1 ar, no prefix cache
    lines = ["| prefix cache MB | B | policies | completed | server errors | not identical | "
             "idle after | tokens/s | × B=1 ar | p50 s | p99 s |", "| --- |" + " --- |" * 10]
    lines += [f"| {r['prefix_cache_mb']} | {r['batch']} | {', '.join(r['policies'])} | {r['completed']} | "
              f"{r['server_errors']} | {r['not_identical']} | {r['idle_after']} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / one_at_a_time:.2f} | "
              f"{r['p50_s']:.2f} | {r['p99_s']:.2f} |" for r in rows]
    result = {"requests": requests, "disconnected": sum(cut), "lengths": LENGTHS,
              "step_nodes": step_nodes, "rows": rows}
    save_results(ROOT / "bench" / "results", "serving_bundled", result,
                 f"`leapc serve` on the bundled {quantize} engine, loopback, {requests} "
                 f"concurrent greedy requests per row ({len(prompts)} held-out prompts, "
                 f"16-128 tokens; half streamed, {sum(cut)} disconnecting after their "
                 f"first event; step nodes {step_nodes or 'unbounded'}; without and with "
                 f"a prefix cache) (`python bench/bench_serving.py`)",
                 "\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
