"""leapc: an ahead-of-time compiler for fast, lossless LLM decoding.

``leapc.build(model, out_dir, backend=...)`` compiles a model into an engine directory;
``leapc.load(path)`` validates and opens one. Importing ``leapc`` stays light (no torch)
so that ORT engines run on machines without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from leapc.ir.errors import MissingDependencyError
from leapc.runtime.engine import Engine, Generation, StreamChunk

__all__ = ["Engine", "Generation", "StreamChunk", "build", "load"]


def build(model, out_dir, backend="ort", *, force: bool = False,
          on_stage: Callable[[str], None] = lambda _: None, **options) -> Path:
    """Compile ``model`` (``"bundled"``, an HF directory, a llama2.c ``.bin``) to an engine;
    ``options`` are `leapc.stage.BuildOptions`' fields, as user values (``"auto"``, enum
    names as strings)."""
    try:
        from leapc.compiler import build as _build
        from leapc.stage import BuildOptions
    except ModuleNotFoundError as err:  # a runtime-only install (`pip install leapc`)
        missing = MissingDependencyError.from_import(err)
        raise missing or err from None

    return _build(model, out_dir, BuildOptions.parse(backend, **options), force=force,
                  on_stage=on_stage)


def load(path: str | Path, device: str = "cpu", policies: Iterable[str] = ()) -> Engine:
    """Open an engine directory, validating its manifest and files first; ``device``
    (``cpu``, ``cuda``, ``tensorrt``) picks ORT's execution providers. The programs of
    ``policies`` load now; any other policy's on its first use."""
    return Engine.load(path, device, policies)
