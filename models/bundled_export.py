"""Write the trained bundled model as a standard Hugging Face directory plus its model card."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from leapc.models import corpus

CARD_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
)


def write_bundled_model(model: LlamaForCausalLM, work: Path, out: Path, title: str,
                        purpose: str) -> None:
    """float16 safetensors, tokenizer files, generation config, then the model card."""
    save_directory(model, work, out)
    write_model_card(out, work, title, purpose)


def save_directory(model: LlamaForCausalLM, work: Path, out: Path) -> None:
    """``model`` as float16 safetensors with ``work``'s tokenizer and a greedy generation
    config: a standard Hugging Face directory."""
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, do_sample=False,
    )
    half.save_pretrained(out)
    PreTrainedTokenizerFast(
        tokenizer_file=str(work / "tokenizer.json"),
        bos_token=corpus.BOS, eos_token=corpus.EOS, pad_token=corpus.PAD,
        model_max_length=model.config.max_position_embeddings,
    ).save_pretrained(out)


def greedy_completions(model_dir: Path, max_new_tokens: int = 48) -> list[tuple[str, str]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = []
    for prompt in CARD_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens)
        pairs.append((prompt, tokenizer.decode(out[0, ids.input_ids.shape[1]:],
                                               skip_special_tokens=True)))
    return pairs


def write_model_card(out: Path, work: Path, title: str, purpose: str) -> None:
    state = json.loads((work / "train_state.json").read_text())
    per_layer = json.loads((work / "eval.json").read_text())["per_layer_loss"]
    cfg = state["config"]
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())
    layer_rows = "\n".join(f"| {i + 1} | {loss:.3f} |" for i, loss in enumerate(per_layer))
    samples = "\n\n".join(f"```python\n{p}{c}\n```" for p, c in greedy_completions(out))
    (out / "README.md").write_text(f"""# {title}

A {params / 1e6:.1f}M-parameter Llama (GQA {cfg['num_heads']}:{cfg['num_kv_heads']} heads,
RoPE, SwiGLU, RMSNorm; {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, tied
embeddings) trained from scratch on a 2-core CPU by `python -m leapc.models.train_base
--preset {state.get("preset", "base")}`, {purpose}.

- **Corpus**: the `*.py` files of the Python {_python_version()} standard library of the
  interpreter that ran the recipe; 5% of files held out by a fixed sha256 of their path
  (`leapc.models.corpus.is_held_out`).
- **Tokenizer**: byte-level BPE, vocabulary {cfg['vocab_size']}, trained with `tokenizers`
  on the training files only. `<|bos|>`=1 starts every document, `<|eos|>`=2 ends it.
- **Training**: context {cfg['context']}, batch {cfg['batch_size']}, {state['step']} steps,
  **{state['tokens'] / 1e6:.1f}M tokens seen**, AdamW (lr {cfg['lr']} cosine to
  {cfg['min_lr']}), bf16 autocast; **wall time {state['seconds'] / 60:.0f} min**.
{_recipe_line(cfg)}
- **Stored** as float16 safetensors; loads with `AutoModelForCausalLM.from_pretrained` and
  `AutoTokenizer.from_pretrained`.

## Held-out loss (nats/token) when exiting after each layer

Overall (full model): **{per_layer[-1]:.3f}** nats/token.

| exit after layer | held-out loss |
| --- | --- |
{layer_rows}

## Greedy completions

{samples}

## Quality on held-out code

Measure it after export with `python bench/bench_quality.py` (next-line exact match with
and without token healing, held-out loss from the engine) and record it here.
""")


def _recipe_line(cfg: dict) -> str:
    if not cfg["early_exit_weight"]:
        return "- **Objective**: plain next-token cross-entropy (no layer dropout, no exits)."
    return (f"- **LayerSkip recipe**: layer dropout rising linearly to "
            f"{cfg['layer_dropout_max']} at the\n  last layer, and an early-exit loss (weight "
            f"{cfg['early_exit_weight']}) through the final\n  norm and the shared LM head at "
            "one exit per step, rotating over the layers — so early\n  layers already predict "
            "the next token (self-speculative drafts).")


def _python_version() -> str:
    import platform

    return platform.python_version()


def write_diffusion_model(model: LlamaForCausalLM, work: Path, out: Path) -> None:
    """The block-diffusion model (models/train_diffusion.py) as a Hugging Face directory,
    then its card with samples decoded by leapc's own ``mdm`` policy."""
    save_directory(model, work, out)
    state = json.loads((work / "train_state.json").read_text())
    losses = json.loads((work / "eval.json").read_text())
    cfg = state["config"]
    samples = "\n\n".join(f"```python\n{p}{c}\n```" for p, c in _diffusion_samples(out))
    (out / "README.md").write_text(f"""# pycoder-15m-diffusion — leapc's bundled block-diffusion model

pycoder-15m (leapc's bundled code model) adapted into a block-diffusion language model on
a 2-core CPU by `python -m leapc.models.train_diffusion`, so that leapc's diffusion
policies (`mdm`, `freedave`, `confidence`, `prophet`, `credit`) have a real model that
needs no download.

- **Decoding contract** (config key `leapc_block_diffusion`): blocks of
  {cfg['block_size']} tokens; the mask id is `<|pad|>` (0), which never occurs in the corpus;
  logits shifted as in Dream: the row at position i predicts the token at i + 1.
- **Attention**: the committed text is causal (a KV cache); the block being decoded sees
  it and itself in both directions (block diffusion, as BD3-LM / SDAR / Fast-dLLM v2).
- **Training**: from pycoder-15m's weights, context {cfg['context']}, batch
  {cfg['batch_size']}, {state['step']} steps ({state['tokens'] / 1e6:.1f}M clean tokens, each
  with a noisy copy), AdamW (lr {cfg['lr']} cosine to {cfg['min_lr']}), bf16 autocast; per
  block a mask rate t ~ U({cfg['min_mask_rate']}, 1); loss: masked-token cross-entropy plus
  {cfg['ar_weight']} × the clean prefix's next-token loss; **wall time
  {state['seconds'] / 60:.0f} min**.
- **Corpus and tokenizer**: pycoder-15m's (the Python standard library, 5% of files held
  out by path; its byte-level BPE, vocabulary {model.config.vocab_size}).

## Held-out loss (nats/token)

| masked tokens (blocks with t ~ U({cfg['min_mask_rate']}, 1)) | next token (the clean prefix) |
| --- | --- |
| {losses['masked_token_loss']:.3f} | {losses['next_token_loss']:.3f} |

## Samples (`mdm`, greedy, 48 tokens)

{samples}
""")


def _diffusion_samples(model_dir: Path, max_new_tokens: int = 48) -> list[tuple[str, str]]:
    import tempfile

    import leapc

    with tempfile.TemporaryDirectory() as tmp:
        engine = leapc.load(leapc.build(model_dir, Path(tmp) / "engine", backend="eager",
                                        max_seq=256))
        return [(p, engine.generate(p, max_new_tokens, policy="mdm").text) for p in CARD_PROMPTS]
