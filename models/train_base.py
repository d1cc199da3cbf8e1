"""Recipe: train the bundled default model (a small Llama on the Python stdlib) on a CPU.

LayerSkip's recipe (Elhoushi et al. 2024), so that early layers already predict the next
token through the shared LM head — what self-speculation (early exit) drafts with:

* layer dropout rising linearly with depth, ``p_l = p_max * l / (L - 1)``, one draw per
  layer per step (dropping a layer for the whole batch also saves its compute);
* an early-exit loss through the final norm and the shared LM head at one exit layer per
  step, rotating over layers 1..L-1 (the "rotational curriculum": the cost of one extra
  LM-head projection per step instead of L of them).

Usage::

    python -m leapc.models.train_base --out models/pycoder-15m   # resumable

Runs in bf16 autocast (AMX/AVX512-BF16 make this several times faster than fp32 on
recent Xeons); weights, optimiser state and checkpoints stay fp32.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from leapc.models import corpus
from leapc.models.training import StepLoss, cosine_lr, resume, run_steps

console = Console()


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 8192
    hidden_size: int = 320
    intermediate_size: int = 864
    num_layers: int = 12
    num_heads: int = 10
    num_kv_heads: int = 2
    context: int = 1024
    batch_size: int = 8
    steps: int = 900
    lr: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup: int = 100
    weight_decay: float = 0.1
    layer_dropout_max: float = 0.1
    early_exit_weight: float = 0.5
    seed: int = 0


PRESETS = {
    # the bundled default model (10-20M parameters, LayerSkip recipe)
    "base": TrainConfig(),
    # its draft model for speculative decoding: same tokenizer, < 2M parameters, no exits
    "draft": TrainConfig(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                         num_kv_heads=2, steps=600, lr=3e-3, min_lr=3e-4,
                         layer_dropout_max=0.0, early_exit_weight=0.0),
}
CARDS = {
    "base": ("pycoder-15m — leapc's bundled default model",
             "so that leapc's demo, tests and benchmarks have a real model that needs no "
             "download"),
    "draft": ("pycoder-draft-2m — the bundled model's draft model",
              "to draft tokens for pycoder-15m in draft-model speculative decoding (same "
              "tokenizer)"),
}


def llama_config(cfg: TrainConfig, bos_id: int, eos_id: int, pad_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.context,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


# ----------------------------------------------------------------------------- data


def prepare_data(work: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizer + token streams, cached in ``work`` (the tokenizer sees training files only)."""
    tok_path, train_path, eval_path = work / "tokenizer.json", work / "train.npy", work / "eval.npy"
    if not tok_path.exists():
        files = corpus.read_stdlib()
        train_texts = [f.text for f in files if not f.held_out]
        eval_texts = [f.text for f in files if f.held_out]
        console.print(f"corpus: {len(train_texts)} train files, {len(eval_texts)} held out")
        tokenizer = corpus.train_tokenizer(train_texts, vocab_size)
        np.save(train_path, corpus.encode_documents(tokenizer, train_texts))
        np.save(eval_path, corpus.encode_documents(tokenizer, eval_texts))
        tokenizer.save(str(tok_path))
    return np.load(train_path), np.load(eval_path)


def sample_batch(stream: np.ndarray, batch: int, context: int, rng: np.random.Generator):
    starts = rng.integers(0, len(stream) - context - 1, size=batch)
    windows = np.stack([stream[s : s + context + 1] for s in starts]).astype(np.int64)
    x = torch.from_numpy(windows)
    return x[:, :-1], x[:, 1:]


# ---------------------------------------------------------------------------- model


def layer_states(model: LlamaForCausalLM, x: torch.Tensor, drop: list[bool] | None = None):
    """Yield the residual stream after each decoder layer (dropped layers pass it through)."""
    inner = model.model
    h = inner.embed_tokens(x)
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    rope = inner.rotary_emb(h, position_ids=positions)
    for i, layer in enumerate(inner.layers):
        if not (drop and drop[i]):
            # attention_mask=None makes the sdpa attention path causal.
            h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=positions)
        yield h


def exit_logits(model: LlamaForCausalLM, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(h))


def training_loss(model, cfg: TrainConfig, x, y, step: int, rng: np.random.Generator):
    layers = cfg.num_layers
    drop = [rng.random() < cfg.layer_dropout_max * i / (layers - 1) for i in range(layers)]
    drop[-1] = False  # the final layer always runs: its output is the main loss
    # rotate over exits after layers 1..L-1 (none when the exit loss is off)
    exit_layer = step % (layers - 1) if cfg.early_exit_weight else -1
    loss = torch.zeros(())
    for i, h in enumerate(layer_states(model, x, drop)):
        if i == exit_layer:
            ce = F.cross_entropy(exit_logits(model, h).flatten(0, 1).float(), y.flatten())
            loss = loss + cfg.early_exit_weight * ce
    final = F.cross_entropy(exit_logits(model, h).flatten(0, 1).float(), y.flatten())
    return loss + final, final


@torch.no_grad()
def per_layer_eval(model, stream: np.ndarray, context: int, windows: int = 48) -> list[float]:
    """Held-out cross-entropy (nats/token) when exiting after each layer; last = full model."""
    model.eval()
    starts = np.linspace(0, len(stream) - context - 1, windows).astype(np.int64)
    totals = np.zeros(len(model.model.layers))
    for s in starts:
        w = torch.from_numpy(stream[s : s + context + 1].astype(np.int64))[None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for i, h in enumerate(layer_states(model, w[:, :-1])):
                totals[i] += F.cross_entropy(exit_logits(model, h)[0].float(), w[0, 1:]).item()
    model.train()
    return (totals / windows).tolist()


def lr_at(cfg: TrainConfig, step: int) -> float:
    return cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup)


# --------------------------------------------------------------------------- driver


def train(cfg: TrainConfig, work: Path) -> LlamaForCausalLM:
    """Train (resuming from ``work/ckpt.pt`` if present); return the trained model."""
    torch.manual_seed(cfg.seed)
    train_stream, _ = prepare_data(work, cfg.vocab_size)
    bos, eos, pad = (corpus.SPECIAL_TOKENS.index(t) for t in (corpus.BOS, corpus.EOS, corpus.PAD))
    model = LlamaForCausalLM(llama_config(cfg, bos, eos, pad))
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    ckpt = work / "ckpt.pt"
    state = resume(ckpt, model, opt, {"step": 0, "tokens": 0, "seconds": 0.0, "log": []})
    if state["step"]:
        console.print(f"resumed at step {state['step']}")

    def loss_at(step: int, rng: np.random.Generator) -> StepLoss:
        x, y = sample_batch(train_stream, cfg.batch_size, cfg.context, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, final = training_loss(model, cfg, x, y, step, rng)
        state["log"].append((step, final.item()))
        return StepLoss(loss, x.numel(), f"loss {final.item():.3f}")

    run_steps("train", model, opt, cfg.steps, lambda step: lr_at(cfg, step), loss_at, ckpt,
              state, cfg.seed, save_every=100, console=console)
    (work / "train_state.json").write_text(json.dumps(
        {k: v for k, v in state.items() if k != "log"} | {"config": asdict(cfg)}, indent=2))
    return model


def main(
    out: Path = typer.Option(Path("models/pycoder-15m"), help="Hugging Face output directory"),
    work: Path = typer.Option(Path(".cache/train/pycoder-15m"), help="data and checkpoints"),
    steps: int = typer.Option(0, help="optimizer steps (0 = the preset's)"),
    threads: int = typer.Option(0, help="torch threads (0 = default)"),
    preset: str = typer.Option("base", help=f"model preset: {', '.join(PRESETS)}"),
) -> None:
    if threads:
        torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    cfg = PRESETS[preset]
    cfg = dataclasses.replace(cfg, steps=steps or cfg.steps)
    model = train(cfg, work)
    state_file = work / "train_state.json"
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"preset": preset}))
    _, eval_stream = prepare_data(work, cfg.vocab_size)
    per_layer = per_layer_eval(model, eval_stream, cfg.context)
    (work / "eval.json").write_text(json.dumps({"per_layer_loss": per_layer}, indent=2))
    from leapc.models.bundled_export import write_bundled_model

    write_bundled_model(model, work, out, *CARDS[preset])
    console.print(f"held-out loss per exit layer: {[round(v, 3) for v in per_layer]}")


if __name__ == "__main__":
    typer.run(main)
