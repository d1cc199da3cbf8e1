"""Load Karpathy's llama2.c checkpoints and tokenizers into Hugging Face objects.

The format (version 0 ``.bin`` checkpoints and ``tok*.bin`` tokenizers) is described
in ``../shared/models/stories260K/README.md``. The point of this module is to use
externally trained llama2.c models wherever the project expects a
``LlamaForCausalLM`` plus a ``tokenizers.Tokenizer``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM

_HEADER = struct.Struct("<7i")
_N_SPECIAL = 3  # <unk>, <s>, </s>
_N_BYTES = 256  # <0x00>..<0xFF> byte-fallback pieces follow the specials


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # negative means the classifier is stored separately (not tied)
    seq_len: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    @property
    def shared_classifier(self) -> bool:
        return self.vocab_size > 0

    def validate(self) -> None:
        sizes = (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads)
        sizes += (abs(self.vocab_size), self.seq_len)
        # RoPE needs an even head_dim; grouped-query attention needs n_kv_heads | n_heads.
        if (
            min(sizes) <= 0
            or self.dim % self.n_heads
            or self.n_heads % self.n_kv_heads
            or self.head_dim % 2
        ):
            raise ValueError(f"bad llama2.c header {self}")

    def n_floats(self) -> int:
        """Number of float32 values that must follow the header."""
        d, h, n_layers, v = self.dim, self.hidden_dim, self.n_layers, abs(self.vocab_size)
        per_layer = 2 * d + 2 * d * d + 2 * self.kv_dim * d + 3 * h * d
        rope_tables = self.seq_len * self.head_dim  # two tables of [seq_len, head_dim / 2]
        classifier = 0 if self.shared_classifier else v * d
        return v * d + n_layers * per_layer + d + rope_tables + classifier


def _parse_header(data: bytes, path: Path) -> Llama2cHeader:
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: truncated llama2.c checkpoint ({len(data)} bytes, no header)")
    header = Llama2cHeader(*_HEADER.unpack_from(data))
    header.validate()
    expected = _HEADER.size + 4 * header.n_floats()
    if len(data) != expected:
        raise ValueError(
            f"{path}: llama2.c checkpoint is {len(data)} bytes but header {header} "
            f"implies {expected} bytes (truncated file or not a version-0 checkpoint)"
        )
    return header


def _rope_pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of wq / wk for Hugging Face's RoPE convention.

    llama2.c rotates adjacent rows (2i, 2i+1) of each head by frequency i; HF's
    ``rotate_half`` rotates rows (i, i + head_dim/2). Within each head, HF row
    ``a * head_dim/2 + i`` must therefore be llama2.c row ``2i + a``: view the rows as
    [heads, head_dim/2, 2] and swap the last two axes. The dot products q.k are unchanged
    because q and k are permuted identically.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _state_dict(h: Llama2cHeader, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        n = int(np.prod(shape))
        offset += n
        return flat[offset - n : offset].view(shape)

    L, d, kv, hid, v = h.n_layers, h.dim, h.kv_dim, h.hidden_dim, abs(h.vocab_size)
    embed = take(v, d)
    arrays = {
        "input_layernorm": take(L, d),
        "self_attn.q_proj": take(L, d, d),
        "self_attn.k_proj": take(L, kv, d),
        "self_attn.v_proj": take(L, kv, d),
        "self_attn.o_proj": take(L, d, d),
        "post_attention_layernorm": take(L, d),
        "mlp.gate_proj": take(L, hid, d),
        "mlp.down_proj": take(L, d, hid),
        "mlp.up_proj": take(L, hid, d),
    }
    norm = take(d)
    take(h.seq_len * h.head_dim)  # legacy precomputed RoPE tables; HF computes its own
    lm_head = embed if h.shared_classifier else take(v, d)

    heads = {"self_attn.q_proj": h.n_heads, "self_attn.k_proj": h.n_kv_heads}
    sd = {"model.embed_tokens.weight": embed, "model.norm.weight": norm, "lm_head.weight": lm_head}
    for name, stacked in arrays.items():
        for layer in range(L):
            w = stacked[layer]
            if name in heads:
                w = _rope_pairs_to_halves(w, heads[name])
            sd[f"model.layers.{layer}.{name}.weight"] = w
    return sd


def load_llama2c_checkpoint(path: Path) -> LlamaForCausalLM:
    """Load a llama2.c version-0 checkpoint as a float32 ``LlamaForCausalLM`` in eval mode."""
    path = Path(path)
    data = path.read_bytes()
    h = _parse_header(data, path)
    flat = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=_HEADER.size).copy())
    config = LlamaConfig(
        vocab_size=abs(h.vocab_size),
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads,
        max_position_embeddings=h.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=h.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        dtype=torch.float32,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(_state_dict(h, flat), strict=True)
    return model.eval()


def _read_pieces(path: Path) -> list[tuple[bytes, float]]:
    """Parse tok*.bin: int32 max_token_length, then per id: float32 score, int32 len, bytes."""
    data = Path(path).read_bytes()
    offset, pieces = 4, []
    try:
        while offset < len(data):
            score, n = struct.unpack_from("<fi", data, offset)
            piece = data[offset + 8 : offset + 8 + n]
            if n < 0 or len(piece) != n:
                raise struct.error(f"piece {len(pieces)} runs past the end")
            pieces.append((piece, score))
            offset += 8 + n
    except struct.error as e:
        raise ValueError(f"{path}: truncated llama2.c tokenizer ({e})") from None
    if len(pieces) < _N_SPECIAL + _N_BYTES:
        raise ValueError(f"{path}: llama2.c tokenizer has only {len(pieces)} pieces")
    return pieces


def load_llama2c_tokenizer(path: Path) -> Tokenizer:
    """Convert a llama2.c ``tok*.bin`` into an equivalent Hugging Face ``Tokenizer``.

    llama2.c encodes by repeatedly merging the adjacent pair whose concatenation is a
    vocabulary piece with the highest score. A BPE model reproduces that when its merge
    list holds every (left, right) split of every piece, ranked by the merged piece's
    score (the same construction transformers uses for SentencePiece BPE models).
    """
    pieces = _read_pieces(path)
    # The file stores BOS/EOS as "\n<s>\n" / "\n</s>\n"; use the usual names instead.
    names = ["<unk>", "<s>", "</s>"] + [p.decode("utf-8") for p, _ in pieces[_N_SPECIAL:]]
    vocab = {name: i for i, name in enumerate(names)}
    scores = {name: score for name, (_, score) in zip(names, pieces, strict=True)}
    mergeable = set(names[_N_SPECIAL + _N_BYTES :])  # byte-fallback pieces never merge in llama2.c
    merges = [
        (piece[:k], piece[k:])
        for piece in sorted(mergeable, key=lambda p: (-scores[p], vocab[p]))
        for k in range(1, len(piece))
        if piece[:k] in mergeable and piece[k:] in mergeable
    ]

    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    # Pieces hold literal spaces (not SentencePiece's U+2581); llama2.c prepends one to
    # non-empty text as the dummy prefix, which the decoder's Strip removes again.
    tok.normalizer = normalizers.Prepend(" ")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    # Fuse before Strip: Strip acts per token, and only the first one carries the prefix.
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for name in names[:_N_SPECIAL]]
    )
    # llama2.c never parses "<s>" in text as BOS; keep it plain text here too. This flag is
    # not serialized by Tokenizer.save / to_str: an engine's manifest records it
    # (TokenizerInfo.encode_special_tokens) and Engine.load sets it on the reloaded one.
    tok.encode_special_tokens = True
    return tok


def load_llama2c(
    bin_path: Path, tokenizer_path: Path | None = None
) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Load a llama2.c model and its tokenizer (default: the single sibling ``tok*.bin``)."""
    bin_path = Path(bin_path)
    if tokenizer_path is None:
        candidates = sorted(bin_path.parent.glob("tok*.bin"))
        if len(candidates) != 1:
            raise ValueError(
                f"expected exactly one tok*.bin next to {bin_path}, found "
                f"{[c.name for c in candidates]}; pass tokenizer_path explicitly"
            )
        tokenizer_path = candidates[0]
    return load_llama2c_checkpoint(bin_path), load_llama2c_tokenizer(tokenizer_path)
