"""Decoding heads on the bundled model: Medusa and Hydra, static and dynamic trees, against
autoregressive decoding on the same engine and transformers' generate(), same run.

    python bench/bench_heads.py          # code_heldout, 8 prompts x 128 tokens, median of 3

Three engines, all ORT with the heads the bundled model ships: Medusa (`--tree auto`),
Hydra (`--tree auto`), and Medusa with its heads inside the step program (`--head-placement
step`, default tree) for the placement comparison. Every static tree is also run
hand-written (the default tree, a chain, a wide tree) at run time through
`DraftOptions.head_tree`, so the auto tree is compared with trees on the same engine.
Writes bench/results/heads_bundled.{json,md}.
"""

from __future__ import annotations

from pathlib import Path

import typer

import leapc
from leapc.benchmark import BenchConfig, PolicyRun, load_prompts, run_bench, save_results
from leapc.heads import HeadsOptions, default_tree
from leapc.ir.head_spec import HeadKind, HeadPlacement
from leapc.runtime.drafters.heads import DynamicTree
from leapc.runtime.policies import DraftOptions

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
CHAIN = ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
WIDE = ((0,), (1,), (2,), (3,), (4,), (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
        (2, 0), (2, 1), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (1, 0, 0),
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0))
ENGINES = {  # name -> (kind, placement, tree)
    "medusa": (HeadKind.MEDUSA, HeadPlacement.PROGRAM, "auto"),
    "hydra": (HeadKind.HYDRA, HeadPlacement.PROGRAM, "auto"),
    "medusa-step": (HeadKind.MEDUSA, HeadPlacement.STEP, None),
}


def engine_for(name: str) -> Path:
    out = CACHE / f"heads-{name}"
    if not (out / "manifest.json").exists():
        kind, placement, tree = ENGINES[name]
        leapc.build("bundled", out, "ort",
                    heads=HeadsOptions(count=4, kind=kind, tree=tree, placement=placement))
    return out


def variants(policy: str, dynamic: str) -> tuple[PolicyRun, ...]:
    """The engine's own (auto) tree, the hand-written trees, and dynamic trees."""
    hand = (("default 15", default_tree(4)), ("chain 4", CHAIN), ("wide 24", WIDE))
    return (PolicyRun(f"{policy} auto tree", policy),
            *(PolicyRun(f"{policy} {label}", policy, DraftOptions(head_tree=tree))
              for label, tree in hand),
            *(PolicyRun(f"{dynamic} {total}/{beam}", dynamic,
                        DraftOptions(dynamic=DynamicTree(total, beam)))
              for total, beam in ((10, 3), (16, 4), (24, 4))))


def markdown(results: dict[str, dict]) -> str:
    lines = ["| engine | policy | tokens/s | tau | vs ar (same engine) | identical to ar | "
             "per-depth acceptance |", "| --- " * 7 + "|"]
    for name, result in results.items():
        for row in result["results"]:
            depth = ", ".join(f"{a:.2f}" for a in row["per_depth_acceptance"][:4])
            lines.append(f"| {name} | {row['policy']} | {row['tokens_per_s']:.1f} | "
                         f"{row['tau']:.2f} | {row['speedup_vs_ar']:.2f}× | "
                         f"{'yes' if row['identical_to_ar'] else 'NO'} | {depth} |")
        hf = result["baselines"].get("hf_generate_tokens_per_s")
        if hf:
            lines.append(f"| transformers | generate() greedy | {hf:.1f} | 1.00 | | "
                         f"{'yes' if result['baselines']['hf_identical_to_ar'] else 'NO'} | |")
    return "\n".join(lines)


def main(max_new_tokens: int = 128, repeats: int = 3, max_prompts: int = 8) -> None:
    prompts = load_prompts(ROOT / "bench" / "prompts" / "code_heldout.jsonl")[:max_prompts]
    results, trees = {}, {}
    for name in ENGINES:
        engine = leapc.load(engine_for(name))
        heads = engine.manifest.heads
        policy, dynamic = (p.value for p in engine.manifest.policies[-2:])
        runs = variants(policy, dynamic) if name != "medusa-step" else (
            PolicyRun(f"{policy} default 15 (step placement)", policy),)
        cfg = BenchConfig(("ar",), prompts, max_new_tokens, repeats, variants=runs)
        results[name] = run_bench(engine, cfg, vs_hf=name == "medusa")
        trees[name] = {"tree": heads.tree, "choice": heads.tree_choice.model_dump()}
    caption = (f"bundled model (pycoder-15m) with its shipped heads, ORT, greedy, "
               f"`code_heldout` ({len(prompts)} prompts) × {max_new_tokens} new tokens, median of "
               f"{repeats} interleaved passes per engine, same run (`python bench/bench_heads.py`)."
               f"\n\nAuto trees: " + "; ".join(
                   f"{n}: {len(t['tree'])} nodes {list(map(list, t['tree']))}"
                   for n, t in trees.items() if t["choice"]["source"] == "auto"))
    save_results(ROOT / "bench" / "results", "heads_bundled",
                 {"results": results, "trees": trees}, caption, markdown(results))


if __name__ == "__main__":
    typer.run(main)
