"""Block-diffusion policies on the bundled diffusion model, against `mdm` (the reference).

    python bench/bench_diffusion.py     # code_heldout 8 prompts x 128 tokens, median of 3

Engines of `pycoder-15m-diffusion` (ORT float32, and int8 with leapc's kernels: the
fastest, and width-invariant, so `freedave` is exact there by construction), greedy,
passes interleaved across policies. Per policy: tokens/s and its ratio to `mdm` on the
same engine, forward passes (step calls) per token, whether the output is `mdm`'s, and
for the lossy ones the quality cost: token agreement with `mdm` and the cross-entropy of
the output under the bundled autoregressive model (pycoder-15m, same weights before the
adaptation; lower is more plausible). The autoregressive model's own `ar` (int8) speed
is in the same run for scale. Writes bench/results/diffusion_bundled.{json,md}.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import leapc
from leapc.benchmark import load_prompts, save_results
from leapc.quality import completion_loss
from leapc.runtime.diffusion import DiffusionOptions

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
PROMPTS = ROOT / "bench" / "prompts" / "code_heldout.jsonl"
ENGINES = {"f32": "none", "int8": "int8"}  # label -> --quantize


@dataclass(frozen=True)
class Run:
    label: str
    policy: str
    options: DiffusionOptions = DiffusionOptions()


RUNS = (
    Run("mdm", "mdm"),
    Run("freedave depth 2", "freedave", DiffusionOptions(depth=2)),
    Run("freedave depth 4", "freedave", DiffusionOptions(depth=4)),
    Run("freedave depth 8", "freedave", DiffusionOptions(depth=8)),
    Run("confidence 0.9", "confidence", DiffusionOptions(threshold=0.9)),
    Run("confidence 0.7", "confidence", DiffusionOptions(threshold=0.7)),
    Run("prophet margin 0.5", "prophet", DiffusionOptions(margin=0.5)),
    Run("credit 2.0", "credit", DiffusionOptions(credit=2.0)),
    Run("credit 1.2", "credit", DiffusionOptions(credit=1.2)),
)


def engine(label: str) -> leapc.Engine:
    out = CACHE / f"diffusion-{label}"
    if not (out / "manifest.json").exists():
        leapc.build("bundled-diffusion", out, "ort", quantize=ENGINES[label])
    return leapc.load(out)


def ar_engine() -> leapc.Engine:
    out = CACHE / "bundled-ort-int8"
    if not (out / "manifest.json").exists():
        leapc.build("bundled", out, "ort", quantize="int8")
    return leapc.load(out)


def timed_pass(eng: leapc.Engine, run: Run, prompts, new: int, policy_kwargs=True):
    kwargs = dict(policy=run.policy, diffusion=run.options) if policy_kwargs else {}
    gens = [eng.generate(p, new, **kwargs) for p in prompts]
    seconds = sum(g.stats.prefill_s + g.stats.decode_s for g in gens)
    return gens, sum(len(g.token_ids) for g in gens) / seconds


def bench_engine(eng: leapc.Engine, scorer: leapc.Engine, prompts, new: int,
                 repeats: int) -> list[dict]:
    speeds = {run.label: [] for run in RUNS}
    last = {}
    for run in RUNS:  # warm-up
        eng.generate(prompts[0], new, policy=run.policy, diffusion=run.options)
    for _ in range(repeats):
        for run in RUNS:
            last[run.label], tps = timed_pass(eng, run, prompts, new)
            speeds[run.label].append(tps)
    reference = [g.token_ids for g in last["mdm"]]
    encoded = [eng.encode(p) for p in prompts]
    rows = []
    for run in RUNS:
        gens = last[run.label]
        ids = [g.token_ids for g in gens]
        calls = sum(sum(g.stats.calls.values()) for g in gens)
        agree = [np.mean(np.asarray(a[: len(b)]) == np.asarray(b[: len(a)])) for a, b in
                 zip(ids, reference, strict=True)]
        loss = [completion_loss(scorer, p, g) for p, g in zip(encoded, ids, strict=True) if g]
        rows.append({
            "policy": run.label, "tokens_per_s": statistics.median(speeds[run.label]),
            "passes_per_token": calls / sum(len(i) for i in ids),
            "identical_to_mdm": ids == reference, "agreement_with_mdm": float(np.mean(agree)),
            "ar_model_loss": float(np.mean(loss)),
        })
    for row in rows:
        row["speedup_vs_mdm"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def markdown(results: dict) -> str:
    lines = ["| engine | policy | tokens/s | × mdm | passes/token | identical to mdm | "
             "agreement with mdm | AR-model loss of output |", "| --- " * 8 + "|"]
    for label, rows in results["engines"].items():
        for r in rows:
            lines.append(f"| {label} | {r['policy']} | {r['tokens_per_s']:.1f} | "
                         f"{r['speedup_vs_mdm']:.2f}× | {r['passes_per_token']:.2f} | "
                         f"{'yes' if r['identical_to_mdm'] else 'no'} | "
                         f"{r['agreement_with_mdm']:.1%} | {r['ar_model_loss']:.3f} |")
    lines.append(f"| int8 | pycoder-15m `ar` (the autoregressive model) | "
                 f"{results['ar_tokens_per_s']:.1f} | | 1.00 | | | "
                 f"{results['ar_loss']:.3f} |")
    return "\n".join(lines)


def main(new: int = 128, repeats: int = 3) -> None:
    prompts = load_prompts(PROMPTS)
    scorer = ar_engine()
    results = {"prompts": len(prompts), "max_new_tokens": new, "repeats": repeats,
               "engines": {}}
    for label in ENGINES:
        results["engines"][label] = bench_engine(engine(label), scorer, prompts, new, repeats)
    ar_gens, _ = timed_pass(scorer, Run("ar", "ar"), prompts, new, policy_kwargs=False)
    ar_speeds = [timed_pass(scorer, Run("ar", "ar"), prompts, new, policy_kwargs=False)[1]
                 for _ in range(repeats)]
    results["ar_tokens_per_s"] = statistics.median(ar_speeds)
    results["ar_loss"] = float(np.mean([completion_loss(scorer, scorer.encode(p), g.token_ids)
                                        for p, g in zip(prompts, ar_gens, strict=True)]))
    caption = (f"Bundled block-diffusion model (pycoder-15m-diffusion, blocks of 8), prompt set "
               f"`code_heldout` ({len(prompts)} prompts), greedy, {new} new tokens, median of "
               f"{repeats}, ORT, same run (`python bench/bench_diffusion.py`). AR-model loss: "
               "cross-entropy of the output under pycoder-15m (nats/token).")
    save_results(ROOT / "bench" / "results", "diffusion_bundled", results, caption,
                 markdown(results))


if __name__ == "__main__":
    import typer

    typer.run(main)
