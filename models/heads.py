"""Trained decoding heads on disk: ``heads.safetensors`` plus ``heads.json`` (the config
and the training report), the form the bundled model's heads ship in and an engine keeps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leapc.ir.errors import InputError
from leapc.ir.head_spec import HeadKind, HeadsConfig
from leapc.ir.heads import DecodingHeads

WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads.json"
BUNDLED_HEADS = Path(__file__).parent / "pycoder-15m-heads"


@dataclass(frozen=True)
class HeadsReport:
    """How the heads were trained and how often they agree with the model (held out)."""

    steps: int
    tokens: int
    seconds: float
    top1: tuple[float, ...]  # per head: P(head top-1 == the model's argmax at t + k)
    top5: tuple[float, ...]
    training: dict


def bundled_heads_dir(kind: HeadKind) -> Path:
    return BUNDLED_HEADS / kind.value


def save_heads(heads: DecodingHeads, report: HeadsReport, directory: Path) -> Path:
    """float16 weights (they ship with the repository) and the config + report."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in heads.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE))
    meta = {"config": heads.config.to_json(), "report": asdict(report)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_heads(directory: Path, hidden_size: int) -> tuple[DecodingHeads, HeadsReport]:
    """Heads saved by `save_heads`, in float32; a directory that is not one is an InputError."""
    if not (directory / WEIGHTS_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
        raise InputError(f"{directory} holds no trained heads ({WEIGHTS_FILE} + {CONFIG_FILE})")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    heads = DecodingHeads(HeadsConfig.from_json(meta["config"]), hidden_size)
    weights = {k: v.float() for k, v in load_file(str(directory / WEIGHTS_FILE)).items()}
    try:
        heads.load_state_dict(weights)
    except RuntimeError as err:
        raise InputError(f"{directory}: heads do not fit this model ({err})") from None
    report = meta["report"]
    return heads, HeadsReport(**{**report, "top1": tuple(report["top1"]),
                                 "top5": tuple(report["top5"])})
