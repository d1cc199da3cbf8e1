"""AOTInductor backend: each program compiled ahead of time into a ``.pt2`` package.

The package holds a shared library (the generated C++ kernels and the wrapper that calls
them, weights embedded) that ``aoti_load_package`` runs through torch's C++ runtime: no
Python runs inside a step. Loading needs torch (same version as the build) but no
compiler and no leapc op declarations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROGRAM_SUFFIX = ".pt2"


def lower(program, out_dir: Path, name: str) -> Path:
    """Compile a `CapturedProgram` into ``out_dir/<name>.pt2``."""
    import torch

    path = out_dir / f"{name}{PROGRAM_SUFFIX}"
    torch._inductor.aoti_compile_and_package(_without_custom_ops(program.program),
                                             package_path=str(path))
    return path


def _without_custom_ops(program):
    """The program with leapc's ops replaced by their pure-torch references, traced to aten.

    AOTInductor would otherwise compile each call into a proxy-executor call back into the
    Python kernel: the package would need leapc's op declarations to load and would take
    the GIL once per layer. Decomposed, inductor fuses the mask, scores and softmax into
    its own C++ kernels. Other ops are kept as they are (the table names only this one).
    """
    import torch

    import leapc.kernels.tree_attention  # noqa: F401  (declares the op to decompose)
    from leapc.kernels import reference

    return program.run_decompositions(
        {torch.ops.leapc.tree_attention.default: reference.tree_attention})


class AotiStep:
    """One AOTInductor package, called on numpy arrays like the other backends' steps."""

    def __init__(self, path: Path, output_names: tuple[str, ...]):
        import torch

        self._torch = torch
        self.runner = torch._inductor.aoti_load_package(str(path))
        self.output_names = output_names

    def __call__(self, tokens, positions, past, mask) -> dict[str, np.ndarray]:
        t = self._torch
        # The generated kernels index inputs with the contiguous strides they were traced
        # with and do not check them: a strided view would be read wrongly, not refused.
        inputs = [t.from_numpy(np.ascontiguousarray(a)) for a in (tokens, positions, past, mask)]
        with t.inference_mode():
            outs = self.runner(*inputs)
        return {name: o.numpy() for name, o in zip(self.output_names, outs, strict=True)}
