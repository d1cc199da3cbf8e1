"""Every decoding policy against autoregressive decoding on the same engine, same run.

    python bench/bench_policies.py --model bundled   # code_heldout + code_edit prompt sets
    python bench/bench_policies.py --model stories   # stories260K, story openings

Greedy, 128 new tokens by default, median of repeats interleaved across policies, with
transformers' generate(), prompt lookup and assisted generation timed in the same process.
The bundled engine carries the bundled draft model and a retrieval datastore of its own
training corpus; stories260K has no draft model, so its draft model is its own first 4 of
5 layers (not trained to exit early: an honest weak draft), and no datastore (its corpus,
TinyStories, is not on this machine), so no retrieval row.
Writes bench/results/policies_<model>_<prompt set>.{json,md,png}.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

import leapc
from leapc.benchmark import BenchConfig, PolicyRun, load_prompts, run_bench
from leapc.models.loaders import BUNDLED_DRAFT, load_source, save_first_layers
from leapc.plots import plot_speedups
from leapc.runtime.policies import DraftOptions

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
STORIES = ROOT.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
PROMPT_SETS = {"bundled": ("code_heldout", "code_edit"), "stories": ("stories",)}

VARIANTS = (  # label, policy, drafting options
    PolicyRun("lookup", "lookup", DraftOptions(max_draft=8)),
    PolicyRun("recycle", "recycle"),
    PolicyRun("lookahead", "lookahead"),
    PolicyRun("retrieval", "retrieval"),
    PolicyRun("draft", "draft", DraftOptions(max_draft=4)),
    PolicyRun("draft tree 2,2", "draft", DraftOptions(max_draft=4, branching=(2, 2))),
    PolicyRun("draft conf 0.3", "draft", DraftOptions(max_draft=8, confidence=0.3)),
)


def engine_for(model: str) -> Path:
    out = CACHE / f"policies-{model}"
    if (out / "manifest.json").exists():
        return out
    if model == "bundled":  # its datastore: its own training corpus (held-out files excluded)
        leapc.build("bundled", out, "ort", draft_model=BUNDLED_DRAFT, datastore="bundled")
    else:
        source = load_source(STORIES)
        draft = save_first_layers(source, 4, CACHE / "stories-draft-4-layers")
        leapc.build(source, out, "ort", draft_model=draft)
    return out


def markdown(result: dict, prompt_set: str, repeats: int) -> str:
    base = result["baselines"]
    counterpart = {"lookup": base.get("hf_prompt_lookup_tokens_per_s"),
                   "draft": base.get("hf_assisted_tokens_per_s")}
    lines = [f"{result['model']}, prompt set `{prompt_set}` ({result['prompts']} prompts), "
             f"greedy, {result['max_new_tokens']} new tokens, median of {repeats}, ORT, "
             "same run (`python bench/bench_policies.py`)", "",
             "| policy | tokens/s | tau | speedup vs ar | identical to ar | per-depth acceptance "
             "| transformers counterpart (tokens/s) |", "| --- " * 7 + "|"]
    for row in result["results"]:
        kind = row["policy"].split()[0]
        other = counterpart.get(kind)
        depth = ", ".join(f"{a:.2f}" for a in row["per_depth_acceptance"][:6])
        lines.append(f"| {row['policy']} | {row['tokens_per_s']:.1f} | {row['tau']:.2f} | "
                     f"{row['speedup_vs_ar']:.2f}× | {'yes' if row['identical_to_ar'] else 'NO'} "
                     f"| {depth} | {f'{other:.1f}' if other else '—'} |")
    lines.append(f"| transformers generate() | {base['hf_generate_tokens_per_s']:.1f} | 1.00 | "
                 f"— | {'yes' if base['hf_identical_to_ar'] else 'NO'} | | |")
    return "\n".join(lines)


def main(model: str = "bundled", max_new_tokens: int = 128, repeats: int = 3,
         max_prompts: int = 8) -> None:
    engine = leapc.load(engine_for(model))
    supported = {p.value for p in engine.manifest.policies}
    variants = tuple(v for v in VARIANTS if v.policy in supported)
    out = ROOT / "bench" / "results"
    for prompt_set in PROMPT_SETS[model]:
        prompts = load_prompts(ROOT / "bench" / "prompts" / f"{prompt_set}.jsonl")
        cfg = BenchConfig(("ar",), prompts[:max_prompts], max_new_tokens, repeats,
                          variants=variants)
        result = run_bench(engine, cfg, vs_hf=True)
        name = f"policies_{model}_{prompt_set}"
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        table = markdown(result, prompt_set, repeats)
        (out / f"{name}.md").write_text(table + "\n")
        plot_speedups(result, out / f"{name}.png")
        print(table, "\n")


if __name__ == "__main__":
    typer.run(main)
