"""int8 weights (`leapc build --quantize int8`) against float32: speed and changed outputs.

    python bench/bench_quantization.py [--max-new-tokens 128] [--repeats 3]

Builds the bundled model twice under .cache/bench/ (float32 and int8, ORT), decodes the
`code_heldout` prompts greedily on both, passes interleaved (noise hits both alike),
and counts the prompts whose output changes against float32 and where it first does.
Writes bench/results/quantization_bundled.{json,md}.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import typer

import leapc
from leapc.benchmark import load_prompts, save_results

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("none", "int8")


def engine(quantize: str) -> leapc.Engine:
    path = ROOT / ".cache" / "bench" / f"quant-{quantize}"
    if not (path / "manifest.json").exists():
        leapc.build("bundled", path, "ort", quantize=quantize)
    return leapc.load(path)


def timed_pass(e: leapc.Engine, prompts, max_new_tokens: int) -> tuple[list[list[int]], float]:
    gens = [e.generate(p, max_new_tokens) for p in prompts]
    seconds = sum(g.stats.prefill_s + g.stats.decode_s for g in gens)
    return [g.token_ids for g in gens], sum(len(g.token_ids) for g in gens) / seconds


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


def main(max_new_tokens: int = 128, repeats: int = 3) -> None:
    prompts = load_prompts(ROOT / "bench" / "prompts" / "code_heldout.jsonl")
    engines = {kind: engine(kind) for kind in KINDS}
    speeds = {kind: [] for kind in KINDS}
    outputs = {}
    for _ in range(repeats):
        for kind, e in engines.items():
            outputs[kind], tps = timed_pass(e, prompts, max_new_tokens)
            speeds[kind].append(tps)
    diffs = [first_difference(a, b) for a, b in zip(outputs["none"], outputs["int8"], strict=True)]
    changed = [d for d in diffs if d is not None]
    size = {k: (e.path / "full.onnx").stat().st_size / 2**20 for k, e in engines.items()}
    result = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "repeats": repeats,
              "tokens_per_s": {k: statistics.median(v) for k, v in speeds.items()},
              "all_tokens_per_s": speeds, "program_mib": size,
              "changed_outputs": len(changed), "first_changed_token": diffs}
    tps = result["tokens_per_s"]
    save_results(ROOT / "bench" / "results", "quantization_bundled", result,
                 f"Bundled model, ORT, `code_heldout` ({len(prompts)} prompts × {max_new_tokens} "
                 f"new tokens), greedy `ar`, median of {repeats} interleaved passes "
                 "(`python bench/bench_quantization.py`)", "\n".join([
                     "| weights | full.onnx MiB | tokens/s | vs float32 | outputs changed vs float32 |",
                     "| --- | --- | --- | --- | --- |",
                     f"| float32 | {size['none']:.1f} | {tps['none']:.1f} | 1.00× | — |",
                     f"| int8 (MatMulNBits, block 32, int8 compute) | {size['int8']:.1f} | "
                     f"{tps['int8']:.1f} | {tps['int8'] / tps['none']:.2f}× | {len(changed)} of "
                     f"{len(prompts)} (first changed token: {sorted(changed)}) |"]))

if __name__ == "__main__":
    typer.run(main)
