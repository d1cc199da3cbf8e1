"""Plots for `leapc bench --plot` (matplotlib is a dev/bench dependency)."""

from __future__ import annotations

from pathlib import Path

from leapc.ir.errors import InputError


def pyplot():
    """matplotlib's pyplot (headless), or an `InputError` where it is not installed: call it
    before benchmarking, not after."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install 'leapc[dev]')") from None
    return plt


def plot_speedups(result: dict, path: Path) -> None:
    plt = pyplot()
    rows = result["results"]
    fig, (speed, hist) = plt.subplots(1, 2, figsize=(10, 3.8))
    speed.bar([r["policy"] for r in rows], [r["speedup_vs_ar"] for r in rows], color="#4c72b0")
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.tick_params(axis="x", labelrotation=30)
    speed.set_ylabel("speedup vs ar")
    speed.set_title(f"{Path(result['model']).name} · {result['backend']}")
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        counts = {int(k): v for k, v in r["emitted_histogram"].items()}
        total = sum(counts.values())
        xs = sorted(counts)
        hist.bar([x + i * width for x in xs], [counts[x] / total for x in xs], width,
                 label=r["policy"])
    hist.set_xlabel("tokens emitted per target call")
    hist.set_ylabel("fraction of calls")
    hist.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
