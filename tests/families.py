"""Tiny random-weight checkpoints of every supported family (and a few unsupported ones).

Shared by the tests of every package: ``tiny_model(family)`` builds a 2-layer, hidden-64,
vocab-256 float32 model in eval mode with deterministic weights; ``tiny_checkpoint`` saves
one as a local Hugging Face directory (for loader and CLI tests); ``captured(family)``
memoises the step program of the tiny model so test modules of one session export each
family once.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
# The families whose cases of a per-family test run in `make test-fast` (the rest are
# marked slow: `family_params`); tiny Llama engines are the fast tier's (tests/conftest.py).
FAST_FAMILIES = ("llama",)

# Configs leapc must refuse, each with a word the refusal message must contain.
UNSUPPORTED = {
    "gemma2": "soft-capping",  # attention logit soft-capping
    "mistral_window": "sliding-window",  # window (16) shorter than max_seq
    "qwen2_window": "sliding-window",
    "bloom": "family",  # a causal LM outside SUPPORTED_FAMILIES (ALiBi attention)
    "llama_dynamic_rope": "dynamic RoPE",  # frequencies recomputed on a data-dependent branch
}

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 64, 2, 4, 2, 16, 128
MAX_POSITIONS = 1024
SMALL_WINDOW = 16

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POSITIONS,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def family_params(families=FAMILIES, fast=FAST_FAMILIES) -> list:
    """``families`` as pytest parameters, each not in ``fast`` marked slow."""
    import pytest

    return [f if f in fast else pytest.param(f, marks=pytest.mark.slow) for f in families]


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """The config of ``tiny_model(family)``."""
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**_COMMON)
    if family == "mistral":
        return t.MistralConfig(**_COMMON, sliding_window=None)
    if family == "qwen2":
        return t.Qwen2Config(**_COMMON)  # has q/k/v biases; no sliding window by default
    if family == "qwen3":
        return t.Qwen3Config(**_COMMON, head_dim=HEAD_DIM)  # q/k norms
    if family == "gemma":
        # (1 + w) norms, sqrt(hidden) embedding scale, tied LM head
        return t.GemmaConfig(**_COMMON, head_dim=HEAD_DIM)
    if family == "phi3":
        return t.Phi3Config(**_COMMON)  # fused qkv and gate_up projections
    if family == "gpt2":
        # Conv1D projections (addmm), learned positions, LayerNorm, tied LM head, no GQA
        return t.GPT2Config(vocab_size=VOCAB, n_positions=MAX_POSITIONS, n_embd=HIDDEN,
                            n_layer=LAYERS, n_head=HEADS, n_inner=FFN, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
                            bos_token_id=1, eos_token_id=2)
    if family == "gemma2":
        return t.Gemma2Config(**_COMMON, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM)
    if family == "mistral_window":
        return t.MistralConfig(**_COMMON, sliding_window=SMALL_WINDOW)
    if family == "qwen2_window":
        return t.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=SMALL_WINDOW,
                             max_window_layers=0)
    if family == "llama_dynamic_rope":
        return t.LlamaConfig(**_COMMON, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                         "rope_theta": 10000.0})
    if family == "bloom":
        return t.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                             initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    raise KeyError(f"no tiny config for family {family!r}")


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random-weight tiny causal LM of ``family``: float32, eval mode, deterministic."""
    config = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            # Default init leaves norm weights at 1 (0 for Gemma's 1 + w) and biases at 0;
            # perturb them so a test cannot pass by skipping a norm scale or a bias.
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def tiny_checkpoint(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Save ``tiny_model(family, seed)`` as a Hugging Face directory; returns the directory."""
    directory = Path(directory)
    tiny_model(family, seed).save_pretrained(directory)
    return directory


@functools.cache
def captured(family: str):
    """The step program of ``tiny_model(family)`` (memoised; never mutate it)."""
    from leapc.ir.capture import CaptureOptions, capture

    return capture(tiny_model(family), CaptureOptions(max_seq=64, max_batch=4, max_new=16))
