"""leapc's custom ops: declarations (``tree_attention``, ``kv_commit``, ``verify_greedy``),
their pure-torch references, ONNX translations and Triton kernels (``triton_*.py``).

Every op runs its reference by default; where triton is installed, each declaration also
registers its Triton kernel for CUDA tensors (see `docs/decisions.md`, "Triton kernels").
"""

from __future__ import annotations

import importlib.util


def triton_installed() -> bool:
    """Whether triton can be imported, without importing it (its import is not free, and
    ``TRITON_INTERPRET`` must be set before it, so only a kernel launch imports it)."""
    return importlib.util.find_spec("triton") is not None
