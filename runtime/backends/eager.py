"""Eager backend: the exported program itself, run by PyTorch (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leapc.runtime.backends.base import BackendImpl, cpu_only
from leapc.runtime.manifest import Attention, Backend

PROGRAM_SUFFIX = ".pt2"


def lower(program, out_dir: Path, name: str, attention: Attention) -> Path:
    import torch

    path = out_dir / f"{name}{PROGRAM_SUFFIX}"
    torch.export.save(program.program, str(path))
    return path


class EagerStep:
    """A saved exported program (the eager backend's, or a TensorRT-compiled one on
    ``device="cuda"``), called on numpy arrays."""

    def __init__(self, path: Path, output_names: tuple[str, ...], device: str = "cpu"):
        import torch

        import leapc.kernels.tree_attention  # noqa: F401  (declares the op a program may call)

        self._torch = torch
        self.module = torch.export.load(str(path)).module()
        self.output_names = output_names
        self.device = device

    def __call__(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        t = self._torch
        with t.inference_mode():
            outs = self.module(*(t.from_numpy(a).to(self.device) for a in inputs))
        return {name: o.cpu().numpy() for name, o in zip(self.output_names, outs, strict=True)}


BACKEND = BackendImpl(
    # CPU only; dense attention (the tree op would run as its Python kernel)
    name=Backend.EAGER, default_attention=Attention.DENSE, lower=lower,
    load=lambda path, outputs, device: EagerStep(path, outputs),
    check_device=cpu_only(Backend.EAGER))
