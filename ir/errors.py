"""Error types shared by every layer.

`LeapcUserError` subclasses are a user's mistake (bad model, bad flag, bad engine
directory): the CLI prints their message as one line and exits with code 2. Everything
else is an internal invariant failure and keeps its traceback.
"""

from __future__ import annotations

import enum
from typing import TypeVar

Choice = TypeVar("Choice", bound=enum.Enum)


class LeapcUserError(Exception):
    """A mistake the user can fix; its message is one self-contained line."""


class UnsupportedModelError(LeapcUserError):
    """The model (family, attention variant or graph) is outside what leapc can compile."""


class EngineError(LeapcUserError):
    """An engine directory is missing, corrupt, or built for something else."""


class InputError(LeapcUserError):
    """A request the engine cannot serve (prompt too long, unknown policy, bad option)."""


class MissingDependencyError(LeapcUserError):
    """A feature needs packages this install lacks (building engines on a runtime install)."""

    COMPILE_PACKAGES = frozenset({"torch", "transformers", "onnx", "onnxscript", "safetensors",
                                  "sympy"})

    @classmethod
    def from_import(cls, err: ModuleNotFoundError) -> MissingDependencyError | None:
        """The user-facing error for a missing compiler package; None for anything else."""
        package = (err.name or "").partition(".")[0]
        if package not in cls.COMPILE_PACKAGES:
            return None
        return cls(f"this needs the compiler dependencies ({package} is not installed): "
                   "pip install 'leapc[compile]'")


class GraphError(Exception):
    """An ir graph helper found a graph unlike what it relies on: an internal error (the
    pass pipeline adds which pass ran it)."""


def parse_choice(kind: type[Choice], value: object, what: str) -> Choice:
    """``kind(value)``, or an `InputError` naming ``what`` and the known values."""
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(str(member.value) for member in kind)
        raise InputError(f"unknown {what} {value!r} (known: {known})") from None


def require_utf8(text: str, what: str) -> str:
    """``text``, if it has a UTF-8 encoding. A str holding lone surrogates has none (a
    command-line argument that is not UTF-8, a JSON "\\udcff" escape); tokenizers reject it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{what} is not valid UTF-8 text (character {err.start})") from None
    return text
