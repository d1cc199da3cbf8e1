"""One copy of an engine's weights for all of its ONNX programs.

An engine's programs repeat each other's weights: an early exit's draft is the first
layers of the step, a layer-skip draft its kept sublayers, every program the embedding
table. Each ONNX Runtime session holding its own copy costs disk and memory again, and a
draft call then evicts the target's weights from the L3 cache, so the verify step after it
streams them from DRAM (docs/decisions.md, "One copy of the weights").

At build time `share_weights` stores every distinct tensor once, in ``weights.data``, as
ONNX external data that each program points into, with an index (``weights.json``: per
program file, each tensor's offset, length, type and shape). At run time `SharedWeights` reads the
file once per engine into one buffer and gives every session its tensors as initializers
that ORT computes on in place (`SessionOptions.add_initializer`). The index is what lets
the torch-free runtime do that without the ``onnx`` package.

ORT could instead map the external data itself; it does, per session and tensor, and the
mapped pages are shared, but measured in the decode loop `ar` ran ~4.5% slower on them
than on one buffer. Programs on ORT's own GEMMs, which repack their weights per session,
are left to that mapping (`OrtStep`).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

WEIGHTS_FILE = "weights.data"
INDEX_FILE = "weights.json"
# Tensors at least this large are shared; smaller ones (norms, biases) stay inline, where
# a page of alignment would cost more than they do.
MIN_SHARED_BYTES = 4096
# Each tensor starts on a page of its own in the file, and the buffer starts on a page:
# every packed weight is as aligned as an allocation of its own would be, and ORT, reading
# the files without this runtime, maps each tensor from its own page.
ALIGNMENT = 4096


class TensorSlice(BaseModel):
    """Where a tensor's bytes are in ``weights.data``, and what they are."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    offset: int
    nbytes: int
    onnx_type: int  # ONNX's TensorProto.DataType
    shape: tuple[int, ...]


class WeightsIndex(BaseModel):
    """``weights.json``: program file -> initializer name -> its slice of the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    programs: dict[str, dict[str, TensorSlice]]


# ------------------------------------------------------------------ build (needs onnx)


def share_weights(programs: list[Path]) -> tuple[Path, Path]:
    """Rewrite the ONNX files ``programs`` (all in one directory) so that each of their
    tensors of `MIN_SHARED_BYTES` or more is external data in ``weights.data`` beside them,
    stored once however many programs hold it; return that file and its index. External
    data the exporter wrote beside a program (``<file>.data``) is read in and removed."""
    import onnx

    directory = programs[0].parent
    offsets: dict[bytes, int] = {}
    index = {}
    with (directory / WEIGHTS_FILE).open("wb") as out:
        for path in programs:
            model = onnx.load(str(path))  # with any external data of its own
            index[path.name] = {tensor.name: _share(tensor, out, offsets)
                                for tensor in model.graph.initializer
                                if len(tensor.raw_data) >= MIN_SHARED_BYTES}
            onnx.save_model(model, str(path))
            path.with_name(f"{path.name}.data").unlink(missing_ok=True)
    (directory / INDEX_FILE).write_text(WeightsIndex(programs=index).model_dump_json())
    return directory / WEIGHTS_FILE, directory / INDEX_FILE


def _share(tensor, out, offsets: dict[bytes, int]) -> TensorSlice:
    """Store ``tensor``'s bytes in the weights file (once per content) and make it ONNX
    external data there; its slice."""
    from onnx import TensorProto

    data = tensor.raw_data
    key = hashlib.sha256(data).digest()
    if key not in offsets:
        out.write(b"\0" * (-out.tell() % ALIGNMENT))
        offsets[key] = out.tell()
        out.write(data)
    where = TensorSlice(offset=offsets[key], nbytes=len(data), onnx_type=tensor.data_type,
                        shape=tuple(tensor.dims))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", WEIGHTS_FILE), ("offset", where.offset),
                       ("length", where.nbytes)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return where


# ------------------------------------------------------------------ run (numpy and ORT only)


class SharedWeights:
    """An engine's ``weights.data`` in one page-aligned buffer, read once, and one
    `ort.OrtValue` per distinct slice of it. Sessions take their tensors from here
    (`initializers`); the OrtValues and the buffer live as long as any session's step."""

    def __init__(self, directory: Path):
        self.index = WeightsIndex.model_validate_json((directory / INDEX_FILE).read_text())
        path = directory / WEIGHTS_FILE
        size = path.stat().st_size
        raw = np.empty(size + ALIGNMENT, np.uint8)
        self.buffer = raw[-raw.ctypes.data % ALIGNMENT:][:size]
        with path.open("rb") as f:
            f.readinto(memoryview(self.buffer))
        self._values: dict[TensorSlice, ort.OrtValue] = {}

    def initializers(self, program: str) -> dict[str, ort.OrtValue]:
        """Initializer name -> value for the program file ``program`` (none if the index
        does not list it)."""
        return {name: self._value(where)
                for name, where in self.index.programs.get(program, {}).items()}

    def _value(self, where: TensorSlice) -> ort.OrtValue:
        if where not in self._values:
            data = self.buffer[where.offset:where.offset + where.nbytes]
            itemsize = where.nbytes // max(math.prod(where.shape), 1)
            elements = data.view(np.dtype(f"u{itemsize}")).reshape(where.shape)
            self._values[where] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                elements, where.onnx_type)
        return self._values[where]


_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_weights(program: Path) -> SharedWeights | None:
    """The shared weights of the engine ``program`` belongs to, loaded once while any of
    its steps lives (keyed by the file's identity, so a rebuilt engine is read anew);
    None for an engine built without them."""
    index = program.parent / INDEX_FILE
    if not index.is_file():
        return None
    stat = (program.parent / WEIGHTS_FILE).stat()
    key = (str(index.resolve()), stat.st_size, stat.st_mtime_ns)
    weights = _LOADED.get(key)
    if weights is None:
        weights = _LOADED[key] = SharedWeights(program.parent)
    return weights
