"""The static numbers of a model that the runtime needs: how its KV cache is shaped.

Torch-free (the manifest embeds them, and ORT engines run without torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class ModelDims:
    """The static numbers of a captured model that the runtime needs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: str

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelDims:
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        )
