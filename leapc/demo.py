"""``leapc demo``: the bundled model end to end, with its engine cached after the first run."""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from leapc import quality
from leapc.benchmark import CODE_PROMPTS, BenchConfig, bench_table, run_bench
from leapc.cache import cache_dir
from leapc.ir.head_spec import HeadKind

DEMO_PROMPTS = CODE_PROMPTS[:3]
DEMO_QUALITY_CASES = 60  # bench/bench_quality.py runs 200
DEMO_HEADS = HeadKind.HYDRA  # the better of the shipped heads (bench/results/heads_bundled.md)


def _engine_key() -> str:
    """Rebuild when the bundled weights (model, draft, heads) or leapc change."""
    from leapc.models.heads import WEIGHTS_FILE, bundled_heads_dir
    from leapc.models.loaders import BUNDLED_DIR, BUNDLED_DRAFT_DIR

    digest = hashlib.sha256(importlib.metadata.version("leapc").encode())
    for weights in (BUNDLED_DIR / "model.safetensors",
                    BUNDLED_DRAFT_DIR / "model.safetensors",
                    bundled_heads_dir(DEMO_HEADS) / WEIGHTS_FILE):
        if weights.exists():
            digest.update(weights.read_bytes())
    return digest.hexdigest()[:12]


def bundled_engine(console: Console) -> Path:
    """The bundled model with its draft model and its shipped heads (tree measured here)."""
    import leapc
    from leapc.heads import HeadsOptions
    from leapc.models.loaders import BUNDLED_DRAFT, BUNDLED_DRAFT_DIR

    path = cache_dir("engines") / f"bundled-ort-{_engine_key()}"
    draft = BUNDLED_DRAFT if (BUNDLED_DRAFT_DIR / "model.safetensors").exists() else None
    if not (path / "manifest.json").exists():
        with console.status("building the bundled model's engine (once)") as status:
            leapc.build("bundled", path, "ort", draft_model=draft,
                        heads=HeadsOptions(count=4, kind=DEMO_HEADS, tree="auto"),
                        on_stage=lambda s: status.update(f"building engine: [bold]{s}"))
    return path


def run_demo(console: Console) -> None:
    import leapc

    path = bundled_engine(console)
    engine = leapc.load(path)
    for prompt in DEMO_PROMPTS:
        # healed, as `leapc run` does: the prompts end in a newline (runtime/healing.py)
        generation = engine.generate(prompt, max_new_tokens=64, token_healing=True)
        console.print(Panel(f"[dim]{prompt}[/][bold]{generation.text}[/]",
                            title=f"{generation.stats.tokens_per_s:.0f} tok/s", expand=False),
                      markup=True, highlight=False)
    with console.status("held-out next-line completion, token healing off and on"):
        scores = quality.next_line_scores(engine, quality.cases(DEMO_QUALITY_CASES))
    console.print(_quality_table(scores))
    policies = tuple(p.value for p in engine.manifest.policies)
    cfg = BenchConfig(policies, CODE_PROMPTS, max_new_tokens=64, repeats=3)
    with console.status("benchmarking (leapc vs transformers generate)"):
        result = run_bench(engine, cfg, vs_hf=True)
    console.print(bench_table(result))


def _quality_table(scores: list[quality.Score]) -> Table:
    table = Table(title=f"Held-out stdlib lines, greedy to the newline ({scores[0].cases} "
                        "per cut): the model is small, healing keeps it on the line")
    for column in ("prompt cut", "token healing", "next-line exact match", "first-word match"):
        table.add_column(column)
    for s in scores:
        table.add_row(s.cut, "on" if s.healing else "off", f"{s.exact:.1%}",
                      f"{s.first_word:.1%}")
    return table
