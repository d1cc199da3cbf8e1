"""Early-exit self-speculation (LayerSkip `early-exit`, Kangaroo's confidence stop) against
`ar` on the same engine and transformers' `assistant_early_exit` at the same exit layer.

    python bench/bench_self_spec.py      # bundled + stories260K, 8 prompts x 128, median of 3

Plus one engine with a layer-skip draft (`--skip auto` for the bundled model).
One ORT engine per exit layer (`leapc build --exit-layer E`, and `--exit-layer auto`: the
layer and draft length its build-time sweep measured fastest), greedy, interleaved passes.
Writes bench/results/self_spec_{bundled,stories}.{json,md}.
"""

from __future__ import annotations

from pathlib import Path

import typer

import leapc
from leapc.benchmark import BenchConfig, PolicyRun, load_prompts, run_bench, save_results
from leapc.runtime.engine import DraftOptions

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
STORIES = ROOT.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
MODELS = {  # name -> (source, exit layers, skip set, prompt file)
    "bundled": ("bundled", (3, 4, 6, "auto"), "auto", "code_heldout.jsonl"),
    # stories260K was not trained for early exit; its skip set is given (the search's
    # calibration text is the bundled model's Python).
    "stories": (str(STORIES), (2, 3), "a1,m3", "stories.jsonl"),
}
LENGTHS = (2, 3, 4, 6)


def engine_for(name: str, exit_layer: int | str | None = None, skip: str | None = None) -> Path:
    out = CACHE / (f"self-spec-{name}-e{exit_layer}" if skip is None
                   else f"self-spec-{name}-skip-{skip}")
    if not (out / "manifest.json").exists():
        leapc.build(MODELS[name][0], out, "ort", exit_layer=exit_layer, skip=skip)
    return out


def variants() -> tuple[PolicyRun, ...]:
    return (PolicyRun("early-exit (engine's d)", "early-exit", DraftOptions()),
            *(PolicyRun(f"early-exit d={d}", "early-exit", DraftOptions(max_draft=d))
              for d in LENGTHS),
            PolicyRun("kangaroo d=8", "kangaroo", DraftOptions(max_draft=8)))


def skip_variants() -> tuple[PolicyRun, ...]:
    return (PolicyRun("layer-skip (engine's d)", "layer-skip", DraftOptions()),
            *(PolicyRun(f"layer-skip d={d}", "layer-skip", DraftOptions(max_draft=d))
              for d in LENGTHS),
            PolicyRun("swift (engine's sets, d and stop by default)", "swift", DraftOptions()))


def markdown(results: dict[str, dict]) -> str:
    lines = ["| engine | policy | tokens/s | tau | vs ar | identical to ar |",
             "| --- " * 6 + "|"]
    for exit_layer, result in results.items():
        for row in result["results"]:
            lines.append(f"| {exit_layer} | {row['policy']} | {row['tokens_per_s']:.1f} | "
                         f"{row['tau']:.2f} | {row['speedup_vs_ar']:.2f}× | "
                         f"{'yes' if row['identical_to_ar'] else 'NO'} |")
        hf = result["baselines"].get("hf_assistant_early_exit_tokens_per_s")
        if hf:
            lines.append(f"| {exit_layer} | transformers assistant_early_exit | {hf:.1f} | | "
                         f"{hf / result['results'][0]['tokens_per_s']:.2f}× | |")
    return "\n".join(lines)


def bench_model(name: str, max_new_tokens: int, repeats: int, max_prompts: int) -> None:
    source, exits, skip, prompt_file = MODELS[name]
    prompts = load_prompts(ROOT / "bench" / "prompts" / prompt_file)[:max_prompts]
    results = {}
    for exit_layer in exits:
        engine = leapc.load(engine_for(name, exit_layer))
        cfg = BenchConfig(("ar",), prompts, max_new_tokens, repeats, variants=variants())
        choice = engine.manifest.exit_choice
        key = f"{engine.manifest.exit_layer} (auto, d={choice.depth})" \
            if exit_layer == "auto" else exit_layer
        results[key] = run_bench(engine, cfg, vs_hf=True)
    engine = leapc.load(engine_for(name, skip=skip))
    cfg = BenchConfig(("ar",), prompts, max_new_tokens, repeats, variants=skip_variants())
    results[f"skip {engine.manifest.skip} ({engine.manifest.skip_choice.source})"] = \
        run_bench(engine, cfg)
    caption = (f"{name}, ORT, greedy, `{prompt_file}` ({len(prompts)} prompts) × "
               f"{max_new_tokens} new tokens, median of {repeats} interleaved passes, same run "
               f"(`python bench/bench_self_spec.py`); `vs ar` is against `ar` on the same engine.")
    save_results(ROOT / "bench" / "results", f"self_spec_{name}", results, caption,
                 markdown(results))


def main(max_new_tokens: int = 128, repeats: int = 3, max_prompts: int = 8) -> None:
    bench_model("bundled", max_new_tokens, repeats, max_prompts)
    if STORIES.is_file():
        bench_model("stories", max_new_tokens, repeats, max_prompts)
    else:
        print(f"stories260K not found at {STORIES}: skipped")


if __name__ == "__main__":
    typer.run(main)
