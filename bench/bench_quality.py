"""The bundled model's quality on held-out code: next-line exact match, with and without
token healing, and held-out loss per token (`leapc.quality` says how each is measured).

    python bench/bench_quality.py [--cases 200] [--windows 64]

Runs on the float32 engine (built once under .cache/bench/). Writes
bench/results/quality_bundled.{json,md}.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

import leapc
from leapc import quality
from leapc.benchmark import save_results
from leapc.models import corpus

ROOT = Path(__file__).resolve().parents[1]


def main(cases: int = 200, windows: int = 64, seed: int = 0) -> None:
    engine_dir = ROOT / ".cache" / "bench" / "bundled-ort"
    if not (engine_dir / "manifest.json").exists():
        leapc.build("bundled", engine_dir, "ort")
    engine = leapc.load(engine_dir)
    scores = quality.next_line_scores(engine, quality.cases(cases, seed))
    held_out = [f.text for f in corpus.read_stdlib() if f.held_out]
    loss = quality.held_out_loss(engine, corpus.text_windows(engine.tokenizer, held_out,
                                                             windows, 256, seed))
    table = (quality.markdown(scores) + f"\n\nHeld-out loss: **{loss:.3f}** nats/token "
             f"({windows} windows of 256 tokens).")
    save_results(ROOT / "bench" / "results", "quality_bundled",
                 {"cases": cases, "scores": [asdict(s) for s in scores],
                  "held_out_loss": loss, "windows": windows},
                 f"Bundled model (float32 engine), {cases} held-out next-line cases, greedy "
                 "to the first newline (`python bench/bench_quality.py`)", table)


if __name__ == "__main__":
    typer.run(main)
