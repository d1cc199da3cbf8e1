"""ONNX Runtime backend: lower with the dynamo ONNX exporter, run with the CPU EP.

Loading and running import only numpy and onnxruntime (edge deployments have no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROGRAM_SUFFIX = ".onnx"


def lower(program, out_dir: Path, name: str) -> Path:
    """Export a `CapturedProgram` to ``out_dir/<name>.onnx`` (weights inline)."""
    import logging

    import torch

    from leapc.ir.capture import STEP_INPUTS
    from leapc.kernels.onnx_translations import OPSET, translations

    # The exporter warns once per torchvision op it cannot register; none are used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    path = out_dir / f"{name}{PROGRAM_SUFFIX}"
    output_names = [s.name for s in program.signature.outputs]
    onnx_program = torch.onnx.export(
        program.program,
        input_names=list(STEP_INPUTS),
        output_names=output_names,
        custom_translation_table=translations(),  # leapc's custom ops, as standard ONNX ops
        opset_version=OPSET,
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    onnx_program.save(str(path))
    return path


def _session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


class OrtStep:
    """One ONNX step program in an InferenceSession."""

    def __init__(self, path: Path, threads: int | None = None):
        threads = threads or int(os.environ.get("LEAPC_THREADS", "0")) or os.cpu_count() or 1
        self.session = ort.InferenceSession(
            str(path), _session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def __call__(self, tokens, positions, past, mask) -> dict[str, np.ndarray]:
        feeds = {"tokens": tokens, "positions": positions, "past": past, "mask": mask}
        return dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
