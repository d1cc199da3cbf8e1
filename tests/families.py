"""Tiny random-weight checkpoints of many families (and a few leapc refuses).

Shared by the tests of every package: ``tiny_model(family)`` builds a 2-layer, hidden-64,
vocab-256 float32 model in eval mode with deterministic weights; ``tiny_checkpoint`` saves
one as a local Hugging Face directory (for loader and CLI tests); ``captured(family)``
memoises the step program of the tiny model so test modules of one session export each
family once.

``FAMILIES`` run every per-family test; ``MORE_FAMILIES`` (each with the structural
features its config exercises) run the greedy equality with ``generate()`` on the ONNX
Runtime engine, and for ``EAGER_FAMILIES`` on the eager engine too
(tests/runtime/test_more_families.py), and for ``PASS_FAMILIES`` the passes;
``UNSUPPORTED`` must be refused by the feature named. docs/families.md is generated from
these (``python tests/families.py``; tests/test_families_doc.py fails when it is stale).
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

# Families beyond FAMILIES, each with what its tiny config exercises (docs/families.md).
MORE_FAMILIES = {
    "mistral_window": "sliding-window attention in every layer (window 16)",
    "cohere": "parallel attention and MLP, LayerNorm without bias, logit scale, tied head",
    "cohere2": "parallel blocks, sliding-window and full layers mixed",
    "gemma2": "attention and final logit soft-capping, sliding-window and full layers, "
              "post-norms, untied head (eager attention in transformers)",
    "gemma2_final_softcap": "final logit soft-capping only, sliding-window and full layers, "
                            "post-norms (eager attention in transformers)",
    "gemma3_text": "sliding-window and full layers with their own RoPE, q/k norms, post-norms",
    "olmo2": "post-norms, q/k norms over all heads",
    "starcoder2": "non-gated MLP, LayerNorm and biases everywhere",
    "stablelm": "partial rotary (25%), per-head q/k LayerNorm, q/k/v biases",
    "phi": "parallel attention and MLP, partial rotary, LM head bias",
    "gpt_neox": "parallel residual, partial rotary, no GQA",
    "falcon": "parallel attention, multi-query attention (one KV head)",
    "granite": "embedding, residual, attention and logit multipliers",
    "nemotron": "LayerNorm1p, squared-ReLU non-gated MLP, partial rotary",
    "gpt_bigcode": "multi-query attention, learned positions, Conv-free GPT-2 layout",
    "glm": "interleaved partial rotary, fused gate/up projection",
    "smollm3": "layers without RoPE (NoPE) among RoPE layers",
    "opt": "learned positions with an offset, ReLU MLP",
    "mixtral": "mixture of experts (4 experts, top 2)",
}
# The MORE_FAMILIES whose greedy equality also runs on the eager engine. It runs the
# captured program itself with torch, the aten ops transformers ran; what it adds per
# family is the attention around them (the tree attention reference: windows,
# soft-capping, one KV head), so these cover those, at ~5 s a family less for the rest.
EAGER_FAMILIES = ("cohere2", "falcon", "gemma2", "mistral_window")
# The MORE_FAMILIES the passes (early-exit slices, layer skipping, decoding heads) are also
# tested on: sequential blocks (skipping a sublayer needs the residual between them) whose
# logits are the LM head's (zero-initialised heads reproduce them only then).
PASS_FAMILIES = ("gemma3_text", "mistral_window", "mixtral", "olmo2", "stablelm", "starcoder2")

# Configs leapc must refuse, each with the feature its refusal message must name.
UNSUPPORTED = {
    "bloom": "ALiBi",  # a bias built from a 2-D padding mask
    "mpt": "ALiBi",
    "llama_dynamic_rope": "dynamic RoPE",  # frequencies recomputed on a data-dependent branch
    "llama4_text": "chunked_attention",  # attention in fixed chunks, not a window
    "gpt_oss": "does not compute the model's own logits",  # attention sinks SDPA ignores
}

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 64, 2, 4, 2, 16, 128
MAX_POSITIONS = 1024
SMALL_WINDOW = 16
ATTN_SOFTCAP = 1.0

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
    return _more_config(family)


FULL = "full_attention"


def _two_types() -> dict:
    """A windowed layer then a full one (windows of SMALL_WINDOW)."""
    return dict(sliding_window=SMALL_WINDOW, layer_types=["sliding_attention", FULL])


def _more_config(family: str) -> transformers.PretrainedConfig:  # noqa: C901, PLR0911 - a table
    t = transformers
    classic = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                   num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   max_position_embeddings=MAX_POSITIONS, initializer_range=0.1,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "cohere":
        return t.CohereConfig(**_COMMON)
    if family == "cohere2":
        return t.Cohere2Config(**_COMMON, **_two_types())
    if family == "gemma2_final_softcap":
        return t.Gemma2Config(**_COMMON, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                              attn_logit_softcapping=None, final_logit_softcapping=5.0,
                              **_two_types())
    if family in ("gemma2", "gemma2_full"):
        # A cap the tiny model's scores reach (Gemma 2's own is 50), and an untied head: tied
        # to the scaled embedding, the tiny model repeats one token whatever its attention
        # does, and greedy output could not tell a dropped cap (with this one it does from
        # the second token). "gemma2_full" has full layers only: the width-invariant
        # lowerings' cap without a window beside it.
        layers = _two_types() if family == "gemma2" else dict(layer_types=[FULL] * LAYERS)
        return t.Gemma2Config(**_COMMON, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                              attn_logit_softcapping=ATTN_SOFTCAP, final_logit_softcapping=5.0,
                              tie_word_embeddings=False, **layers)
    if family == "gemma3_text":
        return t.Gemma3TextConfig(**_COMMON, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                                  **_two_types())
    if family == "olmo2":
        return t.Olmo2Config(**_COMMON)
    if family == "starcoder2":
        return t.Starcoder2Config(**_COMMON, use_bias=True)
    if family == "stablelm":
        return t.StableLmConfig(**_COMMON, use_qkv_bias=True, qk_layernorm=True)
    if family == "phi":
        return t.PhiConfig(**_COMMON)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(**classic, attention_dropout=0.0, hidden_dropout=0.0)
    if family == "falcon":
        return t.FalconConfig(**classic, multi_query=True, parallel_attn=True, alibi=False,
                              bias=True)
    if family == "granite":
        return t.GraniteConfig(**_COMMON, embedding_multiplier=2.0, residual_multiplier=0.5,
                               attention_multiplier=0.2, logits_scaling=4.0)
    if family == "nemotron":
        return t.NemotronConfig(**_COMMON)
    if family == "gpt_bigcode":
        return t.GPTBigCodeConfig(vocab_size=VOCAB, n_positions=MAX_POSITIONS, n_embd=HIDDEN,
                                  n_layer=LAYERS, n_head=HEADS, n_inner=FFN, multi_query=True,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    if family == "glm":
        return t.GlmConfig(**_COMMON, head_dim=HEAD_DIM)
    if family == "smollm3":
        return t.SmolLM3Config(**_COMMON, no_rope_layers=[1, 0])
    if family == "opt":
        return t.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                           ffn_dim=FFN, num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN,
                           max_position_embeddings=MAX_POSITIONS, dropout=0.0,
                           attention_dropout=0.0, init_std=0.1, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        return t.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "mpt":
        return t.MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                           expansion_ratio=2, max_seq_len=MAX_POSITIONS)
    if family == "llama4_text":
        return t.Llama4TextConfig(**_COMMON, head_dim=HEAD_DIM, intermediate_size_mlp=FFN,
                                  num_local_experts=2, attention_chunk_size=SMALL_WINDOW,
                                  layer_types=["chunked_attention", "full_attention"])
    if family == "gpt_oss":
        return t.GptOssConfig(**_COMMON, head_dim=HEAD_DIM, num_local_experts=4,
                              num_experts_per_tok=2, **_two_types())
    if family == "mistral_window":
        return t.MistralConfig(**_COMMON, sliding_window=SMALL_WINDOW)
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


DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


def families_doc() -> str:
    """docs/families.md: the families the tests run and refuse, from the tables above."""
    def model_type(family: str) -> str:
        return tiny_config(family).model_type

    lines = [
        "# Model families",
        "",
        "Generated by `python tests/families.py` from `tests/families.py` (the tests' own",
        "tables); `tests/test_families_doc.py` fails when this page is stale. leapc has no list",
        "of supported families: any `*ForCausalLM` whose forward runs with a `DynamicCache` is",
        "captured, checked against its own forward, or refused by the feature it needs",
        "(docs/decisions.md, \"Capture by structure\").",
        "",
        "## Every per-family test (capture, anatomy, every pass, engines, policies)",
        "",
        ", ".join(f"`{f}`" for f in FAMILIES),
        "",
        "## Greedy output equal to transformers `generate()`: ONNX Runtime, and eager where marked",
        "",
        "Tiny random 2-layer checkpoints, 24 new tokens past a 4-token prompt (past every",
        "16-token sliding window); passes: early-exit draft slice, layer skipping and decoding",
        "heads against the transformers model.",
        "",
        "| test family | model_type | what its config exercises | eager | passes |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| `{f}` | `{model_type(f)}` | {what} | {'yes' if f in EAGER_FAMILIES else ''} | "
              f"{'yes' if f in PASS_FAMILIES else ''} |" for f, what in sorted(MORE_FAMILIES.items())]
    lines += ["", "## Refused by feature (`leapc build` exits 2 with one line naming it)", "",
              "| test family | model_type | the refusal names |", "| --- | --- | --- |"]
    lines += [f"| `{f}` | `{model_type(f)}` | {word} |" for f, word in sorted(UNSUPPORTED.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    DOC.write_text(families_doc())
