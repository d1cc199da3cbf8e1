"""leapc's ONNX Runtime custom-op library (``native/ort_ops.c``, domain ``ai.leapc``):
compiled when an engine is built, and shipped inside it beside the program that uses it.

An engine is an ahead-of-time artifact, so its kernels are compiled with it (as an
AOTInductor package carries its compiled library): the machine that runs it needs no
compiler, only a CPU with the instructions the library was built for, which the library
checks when ONNX Runtime registers it.
"""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
from pathlib import Path

from leapc.ir.errors import InputError

DOMAIN = "ai.leapc"


class WeightFormat(str, enum.Enum):
    """How a leapc GEMM op stores its weights; the op is ``<format>MatMul``."""

    Q8 = "Q8"  # int8 per 32 inputs with float scales, int8 activations (native/q8_gemm.c)
    BF16 = "BF16"  # bfloat16, float32 activations and arithmetic (native/bf16_gemm.c)

    @property
    def op(self) -> str:
        return f"{self.value}MatMul"

    @property
    def ops(self) -> tuple[str, ...]:
        """The op and its forms with a row prologue folded in (`onnx_fuse_matmul_neighbours`)."""
        return self.op, f"RMSNorm{self.op}", f"SwiGLU{self.op}"

SOURCES = ("q8_gemm.c", "bf16_gemm.c", "row_ops.c", "tree_attention.c", "ort_ops.c")
# AVX-512 with VNNI (any CPU that has it: no -march=native, so an engine built on one
# machine runs on another); no contraction of multiply-add into FMA, since the kernels'
# results are defined operation by operation (`leapc.kernels.q8_gemm.reference`).
FLAGS = ("-O3", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
         "-ffp-contract=off", "-fvisibility=hidden", "-fPIC", "-pthread", "-shared")


def library_file(program: Path) -> Path:
    """Where a program's custom-op library sits: ``full.onnx`` -> ``full.ops.so``."""
    return program.with_suffix(".ops.so")


def compile_library(out: Path) -> Path:
    """Compile the library to ``out`` with the C compiler (``$CC``, else ``cc``)."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise InputError(f"--quantize int8 compiles leapc's int8 kernels and needs a C compiler "
                         f"({compiler!r} not found); install one, or build with --quantize "
                         "int8-nbits (ONNX Runtime's own int8 kernels)")
    source = Path(__file__).parent / "native"
    command = [compiler, *FLAGS, *(str(source / name) for name in SOURCES), "-lm", "-o",
               str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling leapc's ORT ops failed ({' '.join(command)}):\n"
                           f"{done.stderr}")
    return out
