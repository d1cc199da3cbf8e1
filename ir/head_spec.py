"""What describes a set of decoding heads, without torch (the runtime reads it from the
manifest; `leapc.ir.heads` holds the torch modules)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class HeadKind(str, enum.Enum):
    MEDUSA = "medusa"  # heads read the hidden state only
    HYDRA = "hydra"  # head k also reads the embedding of the token drafted at depth k - 1


class HeadPlacement(str, enum.Enum):
    """Where the heads run (`leapc.passes.insert_decoding_heads`)."""

    STEP = "step"  # head_logits computed by the step program at every node
    PROGRAM = "program"  # the step program outputs ``hidden``; the heads are their own program


@dataclass(frozen=True)
class HeadsConfig:
    kind: HeadKind
    num_heads: int = 4
    num_blocks: int = 1

    def to_json(self) -> dict:
        return {"kind": self.kind.value, "num_heads": self.num_heads,
                "num_blocks": self.num_blocks}

    @classmethod
    def from_json(cls, data: dict) -> HeadsConfig:
        return cls(HeadKind(data["kind"]), int(data["num_heads"]), int(data["num_blocks"]))
