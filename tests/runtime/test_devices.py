"""`--device`: ORT engines pick the CUDA or TensorRT execution provider where it exists."""

from __future__ import annotations

import onnxruntime as ort
import pytest

import leapc
from leapc.ir.errors import InputError

PROMPT = [5, 17, 200, 5, 17]
GPU_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@pytest.mark.parametrize("device", sorted(GPU_PROVIDERS))
def test_gpu_device_matches_the_cpu_or_is_refused_in_one_line(engine_dir, device):
    engine = engine_dir("tiny-llama", "ort")
    if GPU_PROVIDERS[device] not in ort.get_available_providers():
        with pytest.raises(InputError, match=f"--device {device} needs onnxruntime's "
                                             f".*{GPU_PROVIDERS[device]}.*onnxruntime-gpu"):
            leapc.load(engine, device)
        pytest.skip(f"{GPU_PROVIDERS[device]} is not in this onnxruntime "
                    f"({', '.join(ort.get_available_providers())}); refusal checked instead")
    on_gpu = leapc.load(engine, device).generate(PROMPT, 24, policy="lookup")
    assert on_gpu.token_ids == leapc.load(engine).generate(PROMPT, 24).token_ids


def test_devices_are_for_ort_engines_and_known_by_name(engine_dir):
    with pytest.raises(InputError, match="--device cuda is for ort engines.*eager"):
        leapc.load(engine_dir("tiny-llama", "eager"), "cuda")
    with pytest.raises(InputError, match="unknown device 'tpu' \\(known: cpu, cuda, tensorrt\\)"):
        leapc.load(engine_dir("tiny-llama", "ort"), "tpu")
