"""Self-speculation (LayerSkip `early-exit`, Kangaroo `kangaroo`, `layer-skip`, `swift`)
against `ar` on the same engine and transformers' `assistant_early_exit` at the same exit.

    python bench/bench_self_spec.py      # bundled + stories260K, 8 prompts x 128, median of 3

One ORT engine per exit layer (`leapc build --exit-layer E`, with `--train-adapter` at the
shallow exits, and `--exit-layer auto`: the layer and draft length its build-time sweep
measured fastest), plus one with a layer-skip draft (`--skip auto` for the bundled model).
Greedy, interleaved passes. Adapters are trained on the first run (~15 min each for the
bundled model) into .cache/bench/adapter-<model>-e<E> and reused after.
Writes bench/results/self_spec_{bundled,stories}.{json,md}.
"""

from __future__ import annotations

from pathlib import Path

import typer

import leapc
from leapc.benchmark import BenchConfig, PolicyRun, load_prompts, run_bench, save_results
from leapc.early_exit import AdapterOptions
from leapc.runtime.policies import DraftOptions

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
STORIES = ROOT.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
MODELS = {  # name -> (source, exit layers, exits with an adapter, skip set, prompt file)
    "bundled": ("bundled", (2, 3, 4, "auto"), (2, 3), "auto", "code_heldout.jsonl"),
    # stories260K was not trained for early exit; its skip set is given (the search's
    # calibration text is the bundled model's Python).
    "stories": (str(STORIES), (2, 3), (2, 3), "a1,m3", "stories.jsonl"),
}
LENGTHS = (2, 3, 4, 6)


def engine_for(name: str, exit_layer: int | str | None = None, skip: str | None = None) -> Path:
    out = CACHE / (f"self-spec-{name}-e{exit_layer}" if skip is None
                   else f"self-spec-{name}-skip-{skip}")
    adapter = (AdapterOptions(CACHE / f"adapter-{name}-e{exit_layer}")
               if exit_layer in MODELS[name][2] else None)
    if not (out / "manifest.json").exists():
        leapc.build(MODELS[name][0], out, "ort", exit_layer=exit_layer, adapter=adapter,
                    skip=skip)
    return out


def variants(kangaroo: bool) -> tuple[PolicyRun, ...]:
    early_exit = (PolicyRun("early-exit (engine's d)", "early-exit", DraftOptions()),
                  *(PolicyRun(f"early-exit d={d}", "early-exit", DraftOptions(max_draft=d))
                    for d in LENGTHS))
    if not kangaroo:
        return early_exit
    return (*early_exit,
            PolicyRun("kangaroo (engine's d and stop)", "kangaroo", DraftOptions()),
            *(PolicyRun(f"kangaroo d={d} stop 0.1", "kangaroo",
                        DraftOptions(max_draft=d, confidence=0.1)) for d in (8, 12)))


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
    source, exits, adapters, skip, prompt_file = MODELS[name]
    prompts = load_prompts(ROOT / "bench" / "prompts" / prompt_file)[:max_prompts]
    results = {}
    for exit_layer in exits:
        engine = leapc.load(engine_for(name, exit_layer))
        adapter = engine.manifest.adapter
        cfg = BenchConfig(("ar",), prompts, max_new_tokens, repeats,
                          variants=variants(adapter is not None))
        choice = engine.manifest.exit_choice
        key = f"{engine.manifest.exit_layer} (auto, d={choice.depth})" \
            if exit_layer == "auto" else str(exit_layer)
        if adapter is not None:
            key += (f" + adapter (agreement {adapter.agreement_before:.2f} -> "
                    f"{adapter.agreement_after:.2f}; kangaroo d={adapter.depth}, "
                    f"stop {adapter.confidence})")
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
