"""Recipe: train decoding heads on a frozen model by self-distillation (Medusa-1).

The teacher is the model itself: head k at position t learns the model's own next-token
distribution at position t + k, by forward KL(p_model(. | x_<=t+k) || q_head_k(. | h_t)),
over windows of text the model reads. The backbone is frozen and shared by every head, so
one bf16 forward gives the hidden states and all K teachers. Hydra heads additionally
read the text's token at t + k (teacher forcing: at decode time they read the drafted one).
Per-head losses are weighted 0.8^(k-1) as in Medusa: far heads are harder, and their
drafts are only reached when the near ones were accepted.

The text the model reads is its own: greedy continuations of windows of the given text
(Medusa-2's self-distillation). At decode time the heads extend the model's own greedy
output, which is far more predictable than human text; trained on the corpus itself, the
bundled model's first head agreed with it 0.34 of the time on held-out corpus text, and its
rank-0 candidate was accepted 0.53 of the time on greedy output.

What matters for decoding is reported on held-out prompts' continuations: per head, how
often its top-1 (and top-5) contains the model's own argmax at t + k.

Usage::

    python -m leapc.models.train_heads --kind medusa   # bundled model; resumable
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from transformers import PreTrainedModel

from leapc.ir.head_spec import HeadKind, HeadsConfig
from leapc.ir.heads import DecodingHeads, project
from leapc.models.heads import HeadsReport, save_heads
from leapc.models.training import StepLoss, cosine_lr, extend_greedily, resume, run_steps

console = Console()
HEAD_DECAY = 0.8


@dataclass(frozen=True)
class HeadsTraining:
    heads: HeadsConfig
    context: int = 256
    batch_size: int = 16
    steps: int = 300
    lr: float = 1e-3
    min_lr: float = 1e-4
    seed: int = 0
    sequences: int = 640  # self-generated training sequences
    prompt_tokens: int = 32  # each a window of the text, continued greedily by the model
    eval_sequences: int = 32  # the same, from the held-out text

    @property
    def width(self) -> int:
        """Tokens a training window reads: the context plus K more for the far teachers."""
        return self.context + self.heads.num_heads

    @property
    def generated_tokens(self) -> int:
        return max(self.width - self.prompt_tokens, 1)


@dataclass(frozen=True)
class _Batch:
    hidden: torch.Tensor  # [K, M, H] h_t for every head (the same rows)
    teacher: torch.Tensor  # [K, M, V] log p_model at t + k
    embedded: torch.Tensor | None  # [K, M, H] Hydra: e(x_{t+k})


def _lm_head(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, head.bias


@torch.no_grad()
def _teacher_batch(model: PreTrainedModel, x: torch.Tensor, k_heads: int,
                   hydra: bool) -> _Batch:
    """Hidden states at t in [0, T) and the model's log-probs at t + k, for k = 1..K."""
    weight, bias = _lm_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(x).last_hidden_state.float()  # [B, T + K, H], after the norm
    log_p = F.log_softmax(F.linear(hidden, weight, bias), dim=-1)
    t = x.shape[1] - k_heads
    rows = hidden[:, :t].reshape(-1, hidden.shape[-1])
    teacher = torch.stack([log_p[:, k : k + t].reshape(-1, log_p.shape[-1])
                           for k in range(1, k_heads + 1)])
    embedded = None
    if hydra:
        table = model.get_input_embeddings().weight
        embedded = torch.stack([F.embedding(x[:, k : k + t].reshape(-1), table)
                                for k in range(1, k_heads + 1)])
    return _Batch(rows.expand(k_heads, *rows.shape), teacher, embedded)


def _head_logits(heads: DecodingHeads, model: PreTrainedModel, batch: _Batch) -> torch.Tensor:
    weight, bias = _lm_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = heads.states(batch.hidden, batch.embedded)
        return project(states, weight, bias).float()


def heads_loss(heads: DecodingHeads, model: PreTrainedModel, batch: _Batch) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Weighted total and per-head KL(p_model || q_head), in nats per position."""
    log_q = F.log_softmax(_head_logits(heads, model, batch), dim=-1)
    per_head = (batch.teacher.exp() * (batch.teacher - log_q)).sum(-1).mean(-1)
    weights = HEAD_DECAY ** torch.arange(len(per_head), dtype=per_head.dtype)
    return (weights * per_head).sum() / weights.sum(), per_head.detach()


@torch.no_grad()
def continuations(model: PreTrainedModel, stream: np.ndarray, count: int,
                  config: HeadsTraining, seed: int, batch: int = 32) -> torch.Tensor:
    """``[count, width]`` sequences: windows of ``stream`` continued greedily by the model
    (EOS suppressed, so every row is full length)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - config.prompt_tokens, size=count)
    prompts = torch.from_numpy(np.stack([stream[s : s + config.prompt_tokens]
                                         for s in starts]).astype(np.int64))
    return extend_greedily(model, prompts, config.width, batch)


@torch.no_grad()
def agreement(heads: DecodingHeads, model: PreTrainedModel, sequences: torch.Tensor,
              config: HeadsTraining) -> tuple[list[float], list[float]]:
    """Held-out per-head top-1 and top-5 agreement with the model's argmax at t + k."""
    k = config.heads.num_heads
    top1, top5, total = torch.zeros(k), torch.zeros(k), 0
    for x in sequences.split(1):
        batch = _teacher_batch(model, x, k, heads.is_hydra)
        target = batch.teacher.argmax(-1, keepdim=True)  # [K, M, 1]
        ranked = _head_logits(heads, model, batch).topk(5, dim=-1).indices
        top1 += (ranked[..., :1] == target).any(-1).float().sum(-1)
        top5 += (ranked == target).any(-1).float().sum(-1)
        total += target.shape[1]
    return (top1 / total).tolist(), (top5 / total).tolist()


def _lr(config: HeadsTraining, step: int) -> float:
    return cosine_lr(step, config.steps, config.lr, config.min_lr, max(1, config.steps // 20))


def _generated(model: PreTrainedModel, stream: np.ndarray, count: int, config: HeadsTraining,
               seed: int, file: Path) -> torch.Tensor:
    """`continuations`, cached in ``file`` so a resumed run reads the same text."""
    if file.exists():
        return torch.load(file)
    rows = continuations(model, stream, count, config, seed)
    torch.save(rows, file)
    return rows


def train_heads(model: PreTrainedModel, train: np.ndarray, held_out: np.ndarray,
                config: HeadsTraining, work: Path) -> tuple[DecodingHeads, HeadsReport]:
    """Train ``config.heads`` on ``model`` (frozen) over its continuations of token streams;
    resumable in ``work``."""
    torch.manual_seed(config.seed)
    work.mkdir(parents=True, exist_ok=True)
    model.eval().requires_grad_(False)
    console.print(f"generating {config.sequences} + {config.eval_sequences} continuations "
                  f"of {config.generated_tokens} tokens")
    texts = _generated(model, train, config.sequences, config, config.seed, work / "train.pt")
    held = _generated(model, held_out, config.eval_sequences, config, config.seed + 1,
                      work / "held_out.pt")
    heads = DecodingHeads(config.heads, model.config.get_text_config().hidden_size)
    opt = torch.optim.AdamW(heads.parameters(), lr=config.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    state = resume(work / "heads.pt", heads, opt, {"step": 0, "tokens": 0, "seconds": 0.0})
    k = config.heads.num_heads

    def loss_at(step: int, rng: np.random.Generator) -> StepLoss:
        x = texts[rng.integers(0, len(texts), size=config.batch_size)]
        loss, per_head = heads_loss(heads, model, _teacher_batch(model, x, k, heads.is_hydra))
        shown = " ".join(f"{v:.2f}" for v in per_head.tolist())
        return StepLoss(loss, config.batch_size * config.context, f"KL/head {shown}")

    label = f"{config.heads.kind.value} heads"
    run_steps(label, heads, opt, config.steps, lambda s: _lr(config, s), loss_at,
              work / "heads.pt", state, config.seed, save_every=50, console=console)
    top1, top5 = agreement(heads.eval(), model, held, config)
    report = HeadsReport(steps=state["step"], tokens=state["tokens"], seconds=state["seconds"],
                         top1=tuple(top1), top5=tuple(top5), training=_describe(config))
    return heads, report


def _describe(config: HeadsTraining) -> dict:
    described = asdict(config)
    described["heads"] = config.heads.to_json()
    return described


def main(
    kind: HeadKind = typer.Option(HeadKind.MEDUSA, help="medusa or hydra"),
    heads: int = typer.Option(4, help="number of heads K"),
    blocks: int = typer.Option(1, help="residual blocks per head"),
    steps: int = typer.Option(0, help="optimizer steps (0 = the default)"),
    out: Path = typer.Option(None, help="where to save (default: the bundled model's heads)"),
    work: Path = typer.Option(None, help="checkpoints (default .cache/train/heads-<kind>)"),
    threads: int = typer.Option(0, help="torch threads (0 = all cores)"),
) -> None:
    """Train heads for the bundled model on its training corpus."""
    from leapc.models.distill_draft import token_streams
    from leapc.models.heads import bundled_heads_dir
    from leapc.models.loaders import load_source

    if threads:
        torch.set_num_threads(threads)
    work = work or Path(f".cache/train/heads-{kind.value}")
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = token_streams(work)
    config = HeadsTraining(HeadsConfig(kind, heads, blocks), **({"steps": steps} if steps else {}))
    trained, report = train_heads(load_source("bundled").model, train, held_out, config, work)
    save_heads(trained, report, out or bundled_heads_dir(kind))
    console.print(json.dumps(asdict(report), indent=1))


if __name__ == "__main__":
    typer.run(main)
