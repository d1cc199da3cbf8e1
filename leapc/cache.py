"""leapc's cache: ``$LEAPC_CACHE`` (default ``~/.cache/leapc``), one subdirectory per kind
of file (``engines``: `leapc demo`'s engines; ``gguf``: `leapc bench --vs-llamacpp`'s
GGUFs). Never an engine directory."""

from __future__ import annotations

import os
from pathlib import Path

from leapc.ir.errors import InputError

# What each subdirectory holds, as its error messages name it.
_NAMES = {"engines": "engine cache", "gguf": "GGUF cache"}


def cache_dir(subdirectory: str) -> Path:
    """``$LEAPC_CACHE/<subdirectory>`` (default ``~/.cache/leapc/<subdirectory>``), created
    and checked writable before anything is written into it; an `InputError` naming
    ``LEAPC_CACHE`` otherwise."""
    root = os.environ.get("LEAPC_CACHE") or Path.home() / ".cache" / "leapc"
    directory = Path(root) / subdirectory
    name = _NAMES.get(subdirectory, f"{subdirectory} cache")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the {name} {directory} ({err.strerror}); "
                         "set LEAPC_CACHE to a writable directory") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"the {name} {directory} is not writable; "
                         "set LEAPC_CACHE to a writable directory")
    return directory
