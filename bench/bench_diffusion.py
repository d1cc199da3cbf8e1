"""Block-diffusion policies on the bundled diffusion model, against `mdm` (the reference).

    python bench/bench_diffusion.py     # code_heldout 8 prompts x 128 tokens, median of 3

The int8 engine of `pycoder-15m-diffusion` (leapc's kernels: the fastest, and
width-invariant, so `freedave` is exact there by construction), greedy,
passes interleaved across policies (`leapc.benchmark.run_diffusion_bench`). Per policy:
tokens/s and its ratio to `mdm` on the same engine, forward passes (step calls) per token,
whether the output is `mdm`'s, and for the lossy rules the quality cost: token agreement
with `mdm` and the cross-entropy of the output under the bundled autoregressive model
(pycoder-15m, the weights before adaptation; lower is more plausible). pycoder-15m's own
`ar` (int8, same prompts) is in the same run for scale.
Writes bench/results/diffusion_bundled.{json,md}.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import typer

import leapc
from leapc.benchmark import DiffusionRun, load_prompts, run_diffusion_bench, save_results
from leapc.quality import completion_loss
from leapc.runtime.diffusion import DiffusionOptions

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
PROMPTS = ROOT / "bench" / "prompts" / "code_heldout.jsonl"
ENGINES = {"int8": "int8"}  # label -> --quantize (leapc's kernels: the fastest engine)
RUNS = (
    DiffusionRun("freedave depth 2", "freedave", DiffusionOptions(depth=2)),
    DiffusionRun("freedave depth 4", "freedave", DiffusionOptions(depth=4)),
    DiffusionRun("freedave depth 4 gate 0.5", "freedave", DiffusionOptions(depth=4, gate=0.5)),
    DiffusionRun("confidence 0.9", "confidence", DiffusionOptions(threshold=0.9)),
    DiffusionRun("confidence 0.5", "confidence", DiffusionOptions(threshold=0.5)),
    DiffusionRun("confidence 0.3", "confidence", DiffusionOptions(threshold=0.3)),
    # Below the model's usual confidence: several positions a pass, and the text degrades.
    DiffusionRun("confidence 0.1", "confidence", DiffusionOptions(threshold=0.1)),
    DiffusionRun("confidence 0.02", "confidence", DiffusionOptions(threshold=0.02)),
    DiffusionRun("prophet margin 0.5", "prophet", DiffusionOptions(margin=0.5)),
    DiffusionRun("prophet margin 0.1", "prophet", DiffusionOptions(margin=0.1)),
    DiffusionRun("credit 2.0", "credit", DiffusionOptions(credit=2.0)),
    DiffusionRun("credit 0.8", "credit", DiffusionOptions(credit=0.8)),
    DiffusionRun("credit 0.5", "credit", DiffusionOptions(credit=0.5)),
)


def engine(name: str, source: str, quantize: str) -> leapc.Engine:
    out = CACHE / name
    if not (out / "manifest.json").exists():
        leapc.build(source, out, "ort", quantize=quantize)
    return leapc.load(out)


def ar_baseline(scorer: leapc.Engine, prompts, new: int, repeats: int) -> dict:
    speeds, gens = [], []
    for _ in range(repeats):
        gens = [scorer.generate(p, new) for p in prompts]
        speeds.append(sum(len(g.token_ids) for g in gens)
                      / sum(g.stats.prefill_s + g.stats.decode_s for g in gens))
    loss = np.mean([completion_loss(scorer, scorer.encode(p), g.token_ids)
                    for p, g in zip(prompts, gens, strict=True)])
    return {"tokens_per_s": statistics.median(speeds), "ar_model_loss": float(loss)}


def markdown(results: dict) -> str:
    lines = ["| engine | policy | tokens/s | × mdm | passes/token | identical to mdm | "
             "agreement with mdm | AR-model loss of output |", "| --- " * 8 + "|"]
    for label, result in results["engines"].items():
        for r in result["results"]:
            lines.append(f"| {label} | {r['policy']} | {r['tokens_per_s']:.1f} | "
                         f"{r['speedup_vs_mdm']:.2f}× | {r['passes_per_token']:.2f} | "
                         f"{'yes' if r['identical_to_mdm'] else 'no'} | "
                         f"{r['agreement_with_mdm']:.1%} | {r['ar_model_loss']:.3f} |")
    ar = results["ar"]
    lines.append(f"| int8 | pycoder-15m `ar` (the autoregressive model) | "
                 f"{ar['tokens_per_s']:.1f} | | 1.00 | | | {ar['ar_model_loss']:.3f} |")
    return "\n".join(lines)


def main(new: int = 128, repeats: int = 3) -> None:
    prompts = load_prompts(PROMPTS)
    scorer = engine("bundled-ort-int8", "bundled", "int8")
    results = {"engines": {}}
    for label, quantize in ENGINES.items():
        diffusion = engine(f"diffusion-{label}", "bundled-diffusion", quantize)
        results["engines"][label] = run_diffusion_bench(diffusion, RUNS, prompts, new, repeats,
                                                        scorer)
    results["ar"] = ar_baseline(scorer, prompts, new, repeats)
    caption = (f"Bundled block-diffusion model (pycoder-15m-diffusion, blocks of 8), prompt set "
               f"`code_heldout` ({len(prompts)} prompts), greedy, {new} new tokens, median of "
               f"{repeats}, ORT, same run (`python bench/bench_diffusion.py`). AR-model loss: "
               "cross-entropy of the output under pycoder-15m (nats/token).")
    save_results(ROOT / "bench" / "results", "diffusion_bundled", results, caption,
                 markdown(results))


if __name__ == "__main__":
    typer.run(main)
