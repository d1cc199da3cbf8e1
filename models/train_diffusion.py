"""Recipe: adapt the bundled code model into a block-diffusion language model on a CPU.

The model (`pycoder-15m-diffusion`) decodes a block of ``block_size`` tokens at a time
by unmasking (DESIGN §7c): the committed text is an ordinary causal prefix (its KV is a
KV cache, so the step program is leapc's usual one), and the block being decoded attends
to that prefix and to itself in both directions. This is block diffusion (BD3-LM,
Arriola et al. 2025; SDAR; Fast-dLLM v2), adapted from an autoregressive model as Dream
(Ye et al. 2025) was, keeping its shifted logits: the row at position i predicts the
token at i + 1, so the block's first token is the prefix's next-token prediction and
every other masked token is read from the row before it.

One training step, per sequence x of ``context`` tokens (vectorised as in BD3-LM: the
clean sequence and a noisy copy side by side, one forward):

* clean tokens attend causally (the autoregressive loss keeps the prefix model, which
  predicts every block's first token);
* each block of the noisy copy has a fraction t ~ U(0, 1) of its tokens replaced by the
  mask id; it attends to the clean tokens before the block and to the whole noisy block;
  the loss is the cross-entropy of the masked tokens, read through the shift.

The mask id is the tokenizer's ``<|pad|>``, which never occurs in the corpus (documents
are ``BOS text EOS``), so the tokenizer and the vocabulary stay the bundled model's.

Usage::

    python -m leapc.models.train_diffusion --out models/pycoder-15m-diffusion  # resumable
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

from leapc.models import corpus
from leapc.models.loaders import DIFFUSION_KEY
from leapc.models.training import StepLoss, cosine_lr, resume, run_steps

console = Console()
BUNDLED = Path(__file__).parent / "pycoder-15m"


@dataclass(frozen=True)
class DiffusionConfig:
    block_size: int = 8
    context: int = 256
    batch_size: int = 8
    steps: int = 480
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup: int = 40
    weight_decay: float = 0.1
    ar_weight: float = 0.5  # weight of the clean prefix's next-token loss
    min_mask_rate: float = 0.05
    seed: int = 0


# ----------------------------------------------------------------------------- data


def encoded_streams(work: Path, tokenizer_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """The corpus split (train, held out) encoded with the bundled tokenizer, cached (with
    a copy of the tokenizer, which the exported directory ships)."""
    train_path, eval_path = work / "train.npy", work / "eval.npy"
    if not (work / "tokenizer.json").exists():
        shutil.copy(tokenizer_file, work / "tokenizer.json")
    if not train_path.exists():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        files = corpus.read_stdlib()
        np.save(train_path, corpus.encode_documents(
            tokenizer, [f.text for f in files if not f.held_out]))
        np.save(eval_path, corpus.encode_documents(
            tokenizer, [f.text for f in files if f.held_out]))
    return np.load(train_path), np.load(eval_path)


def sample_windows(stream: np.ndarray, batch: int, context: int,
                   rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - context, size=batch)
    return torch.from_numpy(np.stack([stream[s : s + context] for s in starts]).astype(np.int64))


# ------------------------------------------------------------------------ objective


def training_mask(context: int, block_size: int) -> torch.Tensor:
    """``[2L, 2L]`` bool, True where a query may attend: clean tokens (first L) causally;
    a noisy token (last L) to the clean tokens before its block and to its own block."""
    pos = torch.arange(context)
    block = pos // block_size
    clean = pos[None, :] <= pos[:, None]
    noisy_to_clean = pos[None, :] < (block * block_size)[:, None]
    noisy_to_noisy = block[None, :] == block[:, None]
    top = torch.cat([clean, torch.zeros(context, context, dtype=torch.bool)], dim=1)
    bottom = torch.cat([noisy_to_clean, noisy_to_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


def add_noise(x: torch.Tensor, cfg: DiffusionConfig, mask_id: int,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy copy and where it is masked: one rate t ~ U(min, 1) per block."""
    batch, length = x.shape
    blocks = length // cfg.block_size
    rate = rng.uniform(cfg.min_mask_rate, 1.0, size=(batch, blocks, 1))
    masked = rng.random((batch, blocks, cfg.block_size)) < rate
    masked = torch.from_numpy(masked.reshape(batch, length))
    return torch.where(masked, mask_id, x), masked


def diffusion_targets(x: torch.Tensor, masked: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per noisy position i, the token it predicts (x[i + 1]) where that token is masked and
    in i's block; -100 (ignored) elsewhere. A block's first token is the clean prefix's
    next-token prediction, so the autoregressive loss is what trains it."""
    target = torch.full_like(x, -100)
    nxt = torch.arange(1, x.shape[1])
    same_block = (nxt % block_size) != 0
    keep = masked[:, 1:] & same_block[None, :]
    target[:, :-1] = torch.where(keep, x[:, 1:], -100)
    return target


def training_loss(model: LlamaForCausalLM, cfg: DiffusionConfig, x: torch.Tensor, mask_id: int,
                  attend: torch.Tensor, rng: np.random.Generator):
    noisy, masked = add_noise(x, cfg, mask_id, rng)
    positions = torch.arange(cfg.context).repeat(2)[None].expand(x.shape[0], -1)
    logits = model(input_ids=torch.cat([x, noisy], dim=1), position_ids=positions,
                   attention_mask=attend[None, None].expand(x.shape[0], 1, -1, -1)).logits
    clean, denoised = logits[:, : cfg.context].float(), logits[:, cfg.context :].float()
    ar = F.cross_entropy(clean[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    diffusion = F.cross_entropy(denoised.flatten(0, 1),
                                diffusion_targets(x, masked, cfg.block_size).flatten())
    return diffusion + cfg.ar_weight * ar, diffusion, ar


@torch.no_grad()
def held_out_loss(model: LlamaForCausalLM, cfg: DiffusionConfig, stream: np.ndarray,
                  mask_id: int, windows: int = 32) -> dict[str, float]:
    """Held-out masked-token and next-token cross-entropy (nats/token), fixed noise."""
    model.eval()
    rng = np.random.default_rng(1234)
    attend = training_mask(cfg.context, cfg.block_size)
    totals = np.zeros(2)
    for _ in range(windows):
        x = sample_windows(stream, 1, cfg.context, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, diffusion, ar = training_loss(model, cfg, x, mask_id, attend, rng)
        totals += (diffusion.item(), ar.item())
    model.train()
    return {"masked_token_loss": totals[0] / windows, "next_token_loss": totals[1] / windows}


# --------------------------------------------------------------------------- driver


def diffusion_contract(cfg: DiffusionConfig, mask_id: int) -> dict:
    """What the checkpoint's config records for `leapc build`."""
    return {"block_size": cfg.block_size, "mask_token_id": mask_id, "logits_shift": 1}


def train(cfg: DiffusionConfig, work: Path, base: Path) -> LlamaForCausalLM:
    """Adapt ``base`` (resuming from ``work/ckpt.pt`` if present); return the model."""
    torch.manual_seed(cfg.seed)
    train_stream, _ = encoded_streams(work, base / "tokenizer.json")
    mask_id = corpus.SPECIAL_TOKENS.index(corpus.PAD)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.update({DIFFUSION_KEY: diffusion_contract(cfg, mask_id)})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    ckpt = work / "ckpt.pt"
    state = resume(ckpt, model, opt, {"step": 0, "tokens": 0, "seconds": 0.0, "log": []})
    attend = training_mask(cfg.context, cfg.block_size)

    def loss_at(step: int, rng: np.random.Generator) -> StepLoss:
        x = sample_windows(train_stream, cfg.batch_size, cfg.context, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, diffusion, ar = training_loss(model, cfg, x, mask_id, attend, rng)
        state["log"].append((step, diffusion.item(), ar.item()))
        return StepLoss(loss, x.numel(), f"masked {diffusion.item():.3f} next {ar.item():.3f}")

    run_steps("diffusion", model, opt, cfg.steps,
              lambda step: cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup),
              loss_at, ckpt, state, cfg.seed, save_every=50, console=console)
    (work / "train_state.json").write_text(json.dumps(
        {k: v for k, v in state.items() if k != "log"} | {"config": asdict(cfg)}, indent=2))
    return model


def main(
    out: Path = typer.Option(Path("models/pycoder-15m-diffusion"), help="output directory"),
    work: Path = typer.Option(Path(".cache/train/pycoder-15m-diffusion"),
                              help="data and checkpoints"),
    steps: int = typer.Option(0, help="optimizer steps (0 = the recipe's)"),
    threads: int = typer.Option(0, help="torch threads (0 = default)"),
) -> None:
    if threads:
        torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    cfg = DiffusionConfig()
    cfg = dataclasses.replace(cfg, steps=steps or cfg.steps)
    model = train(cfg, work, BUNDLED)
    _, eval_stream = encoded_streams(work, BUNDLED / "tokenizer.json")
    mask_id = model.config.to_dict()[DIFFUSION_KEY]["mask_token_id"]
    losses = held_out_loss(model, cfg, eval_stream, mask_id)
    (work / "eval.json").write_text(json.dumps(losses, indent=2))
    from leapc.models.bundled_export import write_diffusion_model

    write_diffusion_model(model, work, out)
    console.print(f"held-out: {losses}")


if __name__ == "__main__":
    typer.run(main)
