"""Fixtures the CLI tests share."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from leapc.cli import main


@pytest.fixture
def in_process(capsys):
    """``in_process(*args)``: ``leapc *args`` run by ``leapc.cli.main`` in this process, as
    the `CompletedProcess` a subprocess would give (for `user_error`)."""

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        capsys.readouterr()  # drop what fixtures printed
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as stop:
            code = stop.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run
