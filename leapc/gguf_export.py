"""Write a Llama-architecture GGUF (llama.cpp's model file) from a Hugging Face Llama model:
the baseline `leapc bench --vs-llamacpp` times llama.cpp on, from the weights the engine was
built from.

Three variants: ``f32`` (every tensor float32: the same numbers leapc computes with),
``bf16`` (the 2-D weight matrices bfloat16, norms float32: a bf16 checkpoint as stored) and
``q8_0`` (the 2-D weight matrices in GGML's Q8_0 blocks, norms float32: llama.cpp's usual
fast CPU format). Needs the ``gguf`` package (``pip install 'leapc[llamacpp]'``).

Layout notes, worked out from the GGUF / llama.cpp model definitions:

* GGUF stores a tensor's dimensions innermost first; ``gguf.GGUFWriter`` takes the numpy
  array as torch holds it (``[out_features, in_features]``) and reverses the shape itself.
* RoPE: Hugging Face Llama rotates the pair (i, i + d/2) of each head ("rotate half");
  llama.cpp's ``llama`` architecture rotates the adjacent pair (2i, 2i + 1), with the same
  frequency index i. So the rows of ``q_proj`` and ``k_proj`` are reordered inside each head
  (row 2i <- row i, row 2i + 1 <- row i + d/2): attention scores are dot products over the
  head dimension, unchanged when q and k are permuted alike. ``v_proj`` is not rotated and
  keeps its order.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leapc.cache import cache_dir
from leapc.ir.errors import InputError, MissingDependencyError

# Bump when the writer's output changes: cached files of another version are rewritten.
WRITER_VERSION = 1
# The Hugging Face model types whose decoder is llama.cpp's ``llama`` architecture.
LLAMA_LIKE = ("llama", "mistral")
# llama.cpp's name for a GPT-2 style byte-level pre-tokenizer. The engine's prompts reach
# llama.cpp as token ids, never text, so the name only has to be one llama.cpp loads.
PRE_TOKENIZER = "gpt-2"


class GGUFType(str, enum.Enum):
    F32 = "f32"
    BF16 = "bf16"
    Q8_0 = "q8_0"


def require_gguf():
    """The ``gguf`` module, or a `MissingDependencyError` naming the extra to install."""
    try:
        import gguf
    except ModuleNotFoundError:
        raise MissingDependencyError("--vs-llamacpp needs the gguf package (not installed): "
                                     "pip install 'leapc[llamacpp]'") from None
    return gguf


def check_llama_like(model, what: str = "--vs-llamacpp") -> None:
    """Refuse (one `InputError` line) a model the writer cannot express as ``llama``."""
    config = model.config.get_text_config()
    family = config.model_type
    if family not in LLAMA_LIKE:
        raise InputError(f"{what}: the GGUF writer handles Llama-architecture models "
                         f"({', '.join(LLAMA_LIKE)}); this model is {family!r}")
    why = _unlike_llama(config)
    if why:
        raise InputError(f"{what}: this {family} model has {why}, which the GGUF writer does "
                         "not handle")


def _unlike_llama(config) -> str | None:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "bias terms"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (not silu)"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        return f"RoPE scaling {rope['rope_type']!r}"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    return None


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})


def _rope_theta(config) -> float:
    return float(_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


@dataclass(frozen=True)
class Vocab:
    """A tokenizer as llama.cpp's ``gpt2`` BPE vocabulary."""

    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right", by rank


def gguf_vocab(tokenizer, vocab_size: int) -> Vocab:
    """``tokenizer`` (a `tokenizers.Tokenizer`) padded or cut to ``vocab_size`` entries.

    BPE tokenizers keep their tokens (byte-level strings, as GPT-2's) and merges. Others (the
    tests' WordLevel id tokenizer) keep their tokens and get one placeholder merge: llama.cpp
    requires the merges key and GGUF cannot store an empty array. Added special tokens are
    CONTROL tokens; ids the tokenizer does not name are UNUSED ``[PAD<id>]`` entries.
    llama.cpp indexes tokens by their text, so every entry must be distinct.
    """
    gguf = require_gguf()
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    by_id: dict[int, tuple[str, int]] = {}
    for text, i in (model.get("vocab") or {}).items():
        by_id[int(i)] = (text, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens") or ():
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    tokens, types, seen = [], [], set()
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        if not text or text in seen:  # llama.cpp maps text -> id: no empty or repeated texts
            text, kind = f"[DUP{i}]", gguf.TokenType.UNUSED
        seen.add(text)
        tokens.append(text)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    if model.get("type") != "BPE" or not merges:
        merges = [f"{tokens[0]} {tokens[min(1, vocab_size - 1)]}"]
    return Vocab(tokens, types, merges)


def _interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q_proj / k_proj rows from rotate-half order to adjacent-pair order, head by head."""
    rows, cols = weight.shape
    head_dim = rows // heads
    # [heads, 2 halves, d/2, cols] -> [heads, d/2, 2 halves, cols]: row 2i is half 0's row i
    return (weight.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2)
            .reshape(rows, cols))


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def write_gguf(source, path: Path, kind: GGUFType = GGUFType.F32,
               context_length: int | None = None) -> Path:
    """Write ``source`` (a `SourceModel` of a Llama-like family) to ``path`` as a GGUF.

    ``context_length`` is the ``llama.context_length`` recorded (default: the positions the
    model was trained for). Writes a temporary file beside ``path`` and renames it, so an
    interrupted write leaves no half file under the final name.
    """
    gguf = require_gguf()
    model = source.model
    check_llama_like(model)
    config = model.config.get_text_config()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or \
        config.num_attention_heads
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim % 2:
        raise InputError(f"--vs-llamacpp: head dimension {head_dim} is odd; RoPE needs pairs")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    context = context_length or source.trained_positions or 2048

    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    try:
        writer.add_name(Path(source.name).name or "model")
        writer.add_context_length(int(context))
        writer.add_embedding_length(hidden)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        # how the 2-D weights are stored (None: float32), and the file type that says so
        matrices, file_type = {
            GGUFType.F32: (None, gguf.LlamaFileType.ALL_F32),
            GGUFType.BF16: (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
            GGUFType.Q8_0: (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        }[kind]
        writer.add_file_type(file_type)
        if matrices is not None:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        vocab = gguf_vocab(source.tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        if source.bos_id is not None:
            writer.add_bos_token_id(source.bos_id)
        if source.eos_ids:
            writer.add_eos_token_id(source.eos_ids[0])
        writer.add_add_bos_token(False)  # prompts arrive as the engine's ids, BOS or not

        for name, array in _tensors(model, heads, kv_heads):
            if matrices is not None and array.ndim == 2 and array.shape[1] % 32 == 0:
                writer.add_tensor(name, gguf.quants.quantize(array, matrices),
                                  raw_dtype=matrices)
            else:
                writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


def _tensors(model, heads: int, kv_heads: int):
    """(llama.cpp tensor name, float32 array as torch holds it), in file order."""
    body = model.model
    embed = model.get_input_embeddings().weight
    yield "token_embd.weight", _numpy(embed)
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", _numpy(layer.input_layernorm.weight)
        yield f"blk.{i}.attn_q.weight", _interleave_rope_rows(_numpy(attn.q_proj.weight), heads)
        yield f"blk.{i}.attn_k.weight", _interleave_rope_rows(_numpy(attn.k_proj.weight),
                                                              kv_heads)
        yield f"blk.{i}.attn_v.weight", _numpy(attn.v_proj.weight)
        yield f"blk.{i}.attn_output.weight", _numpy(attn.o_proj.weight)
        yield f"blk.{i}.ffn_norm.weight", _numpy(layer.post_attention_layernorm.weight)
        yield f"blk.{i}.ffn_gate.weight", _numpy(mlp.gate_proj.weight)
        yield f"blk.{i}.ffn_up.weight", _numpy(mlp.up_proj.weight)
        yield f"blk.{i}.ffn_down.weight", _numpy(mlp.down_proj.weight)
    yield "output_norm.weight", _numpy(body.norm.weight)
    head = model.get_output_embeddings().weight
    if head.data_ptr() != embed.data_ptr():  # untied: llama.cpp reuses token_embd otherwise
        yield "output.weight", _numpy(head)


def cached_gguf(source, weights_sha256: str, kind: GGUFType,
                context_length: int | None = None, directory: Path | None = None) -> Path:
    """``source`` as a GGUF of ``kind`` in the cache, written unless already there (keyed by
    the weights' digest, the variant, the context length and the writer's version)."""
    directory = directory or cache_dir("gguf")
    context = context_length or source.trained_positions or 2048
    path = directory / f"{weights_sha256[:16]}-{kind.value}-ctx{context}-v{WRITER_VERSION}.gguf"
    if not path.is_file():
        write_gguf(source, path, kind, context)
    return path
