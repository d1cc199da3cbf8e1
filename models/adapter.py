"""Kangaroo adapters on disk: ``adapter.safetensors`` plus ``adapter.json`` (the config, the
exit layer, the weights sha256 of the model it was trained on, and the training report).

An adapter only fits the model and exit it was trained on, so `--train-adapter PATH`
reuses what PATH holds when both match, trains into an empty PATH, and refuses anything
else rather than overwrite or silently retrain.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from leapc.ir.adapter import AdapterConfig, KangarooAdapter
from leapc.ir.errors import InputError

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
FILES = (WEIGHTS_FILE, CONFIG_FILE)


@dataclass(frozen=True)
class AdapterReport:
    """How the adapter was trained, and how often the exit's argmax equals the model's on
    held-out continuations: through the model's head alone (before) and the adapter."""

    steps: int
    seconds: float
    agreement_before: float
    agreement_after: float
    training: dict


def save_adapter(adapter: KangarooAdapter, exit_layer: int, fingerprint: str,
                 report: AdapterReport, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE))
    meta = {"config": adapter.config.to_json(), "exit_layer": exit_layer, "model": fingerprint,
            "report": asdict(report)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def holds_adapter(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def load_adapter(directory: Path, exit_layer: int,
                 fingerprint: str) -> tuple[KangarooAdapter, AdapterReport]:
    """The adapter in ``directory``; an InputError if it was trained for another model or exit."""
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta["model"] != fingerprint or meta["exit_layer"] != exit_layer:
        raise InputError(f"{directory} holds an adapter for another model or exit layer (exit "
                         f"{meta['exit_layer']}); give an empty directory to train a new one")
    adapter = KangarooAdapter(AdapterConfig.from_json(meta["config"]))
    adapter.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return adapter.eval(), AdapterReport(**meta["report"])
