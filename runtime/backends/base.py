"""What every backend provides: a loaded step program callable on numpy arrays.

The runtime loop speaks numpy (the ONNX path has no torch); a backend converts at its
boundary. ``lower`` functions (which need torch) live in each backend's module but import
torch inside the function, so loading an ORT engine never imports it.
"""

from __future__ import annotations

import enum
import os
from typing import Protocol

import numpy as np

from leapc.ir.errors import InputError


class StepFunction(Protocol):
    """``(tokens, positions, past, mask) -> outputs by name`` (``logits``, ``present``, ...)."""

    output_names: tuple[str, ...]

    def __call__(
        self, tokens: np.ndarray, positions: np.ndarray, past: np.ndarray, mask: np.ndarray
    ) -> dict[str, np.ndarray]: ...


class Device(str, enum.Enum):
    """Where an engine's programs run. ORT engines pick execution providers by it."""

    CPU = "cpu"
    CUDA = "cuda"  # ORT's CUDA execution provider
    TENSORRT = "tensorrt"  # ORT's TensorRT execution provider (CUDA for what it lacks)


def configured_threads() -> int:
    """``LEAPC_THREADS``: the threads every program of the process runs on; 0 (or unset)
    leaves the choice to the backend (all cores)."""
    value = os.environ.get("LEAPC_THREADS", "").strip()
    if not value:
        return 0
    if value.isascii() and value.isdigit():
        return int(value)
    raise InputError(f"LEAPC_THREADS must be a whole number of threads, 0 for all cores "
                     f"(got {value!r})")
