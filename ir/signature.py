"""The step program's signature: symbolic shapes with declared bounds.

Three symbols describe every step call: ``B`` sequences, ``N`` new tokens each, ``T`` past
slots. Shapes are sympy expressions of them (the mask's last dim is ``T + N``); every
backend turns the signature into its own form (ORT dynamic axes, TensorRT profiles,
AOTInductor dynamic shapes) and `leapc inspect` prints it, memory formula included.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

B, N, T = sympy.symbols("B N T", integer=True, positive=True)
S = sympy.Symbol("S", integer=True, positive=True)  # cache slots, in memory formulas
SYMBOLS = {"B": B, "N": N, "T": T}

Dim = sympy.Expr | int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "int64", "float32", "bool"
    shape: tuple[Dim, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": [str(d) for d in self.shape]}

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        shape = tuple(sympy.sympify(d, locals=SYMBOLS) for d in data["shape"])
        return cls(data["name"], data["dtype"], tuple(int(d) if d.is_Integer else d for d in shape))


@dataclass(frozen=True)
class StepSignature:
    """Inputs, outputs and the inclusive bounds of B, N, T (plus ``T + N <= max_seq``)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    bounds: dict[str, tuple[int, int]]
    max_seq: int

    def spec(self, name: str) -> TensorSpec:
        for s in (*self.inputs, *self.outputs):
            if s.name == name:
                return s
        raise KeyError(f"step signature has no tensor named {name!r}")

    def kv_bytes(self, itemsize: int) -> sympy.Expr:
        """KV-cache bytes for B sequences of S slots: ``L*2*B*Hkv*S*Dh*itemsize``."""
        layers, two, _, heads, _, head_dim = self.spec("past").shape
        return sympy.Integer(layers * two * heads * head_dim * itemsize) * B * S

    def with_outputs(self, outputs: tuple[TensorSpec, ...]) -> StepSignature:
        return StepSignature(self.inputs, outputs, self.bounds, self.max_seq)

    def to_json(self) -> dict:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            "max_seq": self.max_seq,
        }

    @classmethod
    def from_json(cls, data: dict) -> StepSignature:
        return cls(
            tuple(TensorSpec.from_json(s) for s in data["inputs"]),
            tuple(TensorSpec.from_json(s) for s in data["outputs"]),
            {k: (int(v[0]), int(v[1])) for k, v in data["bounds"].items()},
            int(data["max_seq"]),
        )
