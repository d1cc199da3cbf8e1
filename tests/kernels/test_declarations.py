"""Declaring leapc's ops imports no triton: the CUDA registrations import their Triton
modules at the first launch (triton's import is not free, and must follow
``TRITON_INTERPRET`` where the interpreter is wanted)."""

from __future__ import annotations

import subprocess
import sys

DECLARE = """
import sys
import leapc.kernels.kv_commit, leapc.kernels.tree_attention, leapc.kernels.verify_greedy
imported = sorted(m for m in sys.modules if m.partition(".")[0] == "triton"
                  or m.startswith("leapc.kernels.triton_"))
assert not imported, f"declaring the ops imported {imported}"
"""


def test_declaring_the_ops_imports_no_triton(tmp_path):
    # cwd: not the repository root, where ``import leapc`` would find the bare folder
    result = subprocess.run([sys.executable, "-c", DECLARE], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
