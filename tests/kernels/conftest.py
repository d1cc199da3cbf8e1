import os

import pytest
import torch


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where the Triton kernels run: the GPU, else the CPU under Triton's interpreter
    (``TRITON_INTERPRET=1``, set by tests/conftest.py before triton is imported)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA, and TRITON_INTERPRET is not 1: the Triton kernels cannot run")
    return "cpu"
