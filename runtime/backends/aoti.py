"""AOTInductor backend: each program compiled ahead of time into a ``.pt2`` package.

The package holds a shared library (the generated C++ kernels and the wrapper that calls
them, weights embedded) that ``aoti_load_package`` runs through torch's C++ runtime: no
Python runs inside a step. Loading needs torch (same version as the build) but no
compiler and no leapc op declarations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leapc.runtime.backends.base import BackendImpl, configured_threads, cpu_only
from leapc.runtime.manifest import Attention, Backend

PROGRAM_SUFFIX = ".pt2"


def lower(program, out_dir: Path, name: str, attention: Attention) -> Path:
    """Compile a `CapturedProgram` into ``out_dir/<name>.pt2``."""
    import torch

    path = out_dir / f"{name}{PROGRAM_SUFFIX}"
    torch._inductor.aoti_compile_and_package(_without_custom_ops(program.program),
                                             package_path=str(path))
    return path


def _without_custom_ops(program):
    """The program with leapc's attention ops decomposed into aten ops before compiling.

    AOTInductor would otherwise compile each call into a proxy-executor call back into the
    Python kernel: the package would need leapc's op declarations to load and would take
    the GIL once per layer. Other ops are kept as they are (the table names only these).
    Soft-capped attention decomposes into its definition's matmuls, ``tanh`` and softmax
    (SDPA has no cap).
    """
    import torch

    import leapc.kernels.tree_attention  # noqa: F401  (declares the ops to decompose)
    from leapc.ir.capped_attention import capped_sdpa

    return program.run_decompositions({torch.ops.leapc.tree_attention.default: fused_sdpa,
                                       torch.ops.leapc.capped_attention.default: capped_sdpa})


def fused_sdpa(q, k, v, past_len, tree_mask, scale: float, softcap: float = 0.0,
               window: int = 0):
    """``leapc.tree_attention`` as one SDPA call: the boolean mask is the reference's
    `visible_keys` (`within_window` of it with a window), and ``enable_gqa`` reads KV head h // G as the reference does; with a
    soft cap, the reference itself (SDPA has no cap).

    Inductor keeps SDPA as torch's fused CPU attention kernel; the reference's matmuls and
    masked softmax, decomposed instead, made a verify step of 32 nodes over a 990-token
    past 1.4x slower than the dense program (docs/decisions.md).
    """
    from torch.nn.functional import scaled_dot_product_attention

    from leapc.kernels.reference import tree_attention, visible_keys, within_window

    if softcap:
        return tree_attention(q, k, v, past_len, tree_mask, scale, softcap, window)
    visible = visible_keys(past_len, tree_mask, k.shape[2] - q.shape[2])
    visible = (within_window(visible, window) if window else visible)[:, None]
    return scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)


class AotiStep:
    """One AOTInductor package, called on numpy arrays like the other backends' steps.

    Its kernels run on torch's OpenMP pool, which is per process: ``LEAPC_THREADS``, when
    set, sizes that pool for every program loaded (there is no per-program pool to give a
    helper program one thread, as ORT sessions have).
    """

    def __init__(self, path: Path, output_names: tuple[str, ...]):
        import torch

        threads = configured_threads()
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.runner = torch._inductor.aoti_load_package(str(path))
        self.output_names = output_names

    def __call__(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        t = self._torch
        # The generated kernels index inputs with the contiguous strides they were traced
        # with and do not check them: a strided view would be read wrongly, not refused.
        tensors = [t.from_numpy(np.ascontiguousarray(a)) for a in inputs]
        with t.inference_mode():
            outs = self.runner(*tensors)
        return {name: o.numpy() for name, o in zip(self.output_names, outs, strict=True)}


BACKEND = BackendImpl(
    # CPU only; tree attention (compiled as one fused SDPA, `fused_sdpa`)
    name=Backend.AOTI, default_attention=Attention.TREE, lower=lower,
    load=lambda path, outputs, device: AotiStep(path, outputs),
    check_device=cpu_only(Backend.AOTI))
