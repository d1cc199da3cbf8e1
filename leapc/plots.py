"""Plots for `leapc bench --plot` (matplotlib is a dev/bench dependency)."""

from __future__ import annotations

from pathlib import Path

from leapc.ir.errors import InputError


def plot_speedups(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install 'leapc[dev]')") from None
    rows = result["results"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["policy"] for r in rows], [r["speedup_vs_ar"] for r in rows], color="#4c72b0")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("speedup vs ar")
    ax.set_title(f"{Path(result['model']).name} · {result['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
