"""ONNX Runtime backend: lower with the dynamo ONNX exporter, run with the CPU EP.

Loading and running import only numpy and onnxruntime (edge deployments have no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from leapc.ir.errors import InputError
from leapc.runtime.backends.base import Device

PROGRAM_SUFFIX = ".onnx"


def lower(program, out_dir: Path, name: str) -> Path:
    """Export a `CapturedProgram` to ``out_dir/<name>.onnx`` (weights inline)."""
    import logging

    import torch

    from leapc.kernels.onnx_translations import OPSET, translations

    # The exporter warns once per torchvision op it cannot register; none are used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    path = out_dir / f"{name}{PROGRAM_SUFFIX}"
    output_names = [s.name for s in program.signature.outputs]
    onnx_program = torch.onnx.export(
        program.program,
        input_names=[s.name for s in program.signature.inputs],
        output_names=output_names,
        custom_translation_table=translations(),  # leapc's custom ops, as standard ONNX ops
        opset_version=OPSET,
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    onnx_program.save(str(path))
    return path


def quantize_weights(path: Path, bits: int, block_size: int = 32) -> None:
    """Rewrite ``path`` with weight-only quantized MatMuls (``MatMulNBits``: symmetric
    integer weights, one float scale per ``block_size`` input rows of each column), in
    place. Only MatMuls with constant weights change: the tied LM head (a MatMul on the
    transposed embedding table), embeddings and norms stay float32.

    ``accuracy_level`` 4 lets ORT quantize each activation block to int8 on the fly and
    multiply in int8 (VNNI / AMX): measured on the bundled model, 2.06 ms a step against
    2.66 ms in float32, while level 1 (dequantize the weights, multiply in float32) took
    11.7 ms. So the weights are what is stored quantized, and the arithmetic is int8 too.
    """
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # The quantizer logs a line per graph node at INFO.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                          accuracy_level=4, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=bits, block_size=block_size,
                                     is_symmetric=True, accuracy_level=4, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)


def _session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


# Execution providers per device, in ORT's order of preference; the CPU provider runs
# whatever a GPU provider does not take.
PROVIDERS = {
    Device.CPU: ("CPUExecutionProvider",),
    Device.CUDA: ("CUDAExecutionProvider", "CPUExecutionProvider"),
    Device.TENSORRT: ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                      "CPUExecutionProvider"),
}


def check_device(device: Device) -> None:
    """Refuse a device this onnxruntime build cannot run (the CPU-only wheel has no GPU
    providers: onnxruntime-gpu does)."""
    missing = [p for p in PROVIDERS[device] if p not in ort.get_available_providers()]
    if missing:
        raise InputError(f"--device {device.value} needs onnxruntime's {', '.join(missing)}, "
                         "which this onnxruntime lacks (pip install onnxruntime-gpu)")


class OrtStep:
    """One ONNX program (a step program, or a helper such as ``heads``) in an
    InferenceSession, called with its inputs in signature order."""

    def __init__(self, path: Path, threads: int | None = None, device: Device = Device.CPU):
        threads = threads or int(os.environ.get("LEAPC_THREADS", "0")) or os.cpu_count() or 1
        self.session = ort.InferenceSession(
            str(path), _session_options(threads), providers=list(PROVIDERS[device])
        )
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def __call__(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = dict(zip(self.input_names, inputs, strict=True))
        return dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
