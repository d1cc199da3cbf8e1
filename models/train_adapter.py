"""Recipe: train Kangaroo's adapter at an early exit by distillation on the frozen model.

The adapter (`ir/adapter.py`) reads the residual stream entering layer E and feeds the
model's own final norm and LM head; it learns the model's next-token distribution there,
minimising the forward KL(p_model(. | x_<=t) || q_exit(. | h_E,<=t)) at every position.
Only the adapter trains: the model gives h_E and the teacher in one forward, and the head
is the captured program's own (`ir.early_exit.slice_head`), the very ops the
engine's draft runs after the adapter.

As for decoding heads, the text is the model's own greedy continuation of windows of the
corpus (training files; agreement is reported on held-out files): drafts extend the
model's greedy output, not human text. The report gives held-out top-1 agreement with the
model without the adapter (the plain exit) and with it.

Usage::

    python -m leapc.models.train_adapter --exit-layer 3 --out models/pycoder-15m-kangaroo
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from torch.fx import GraphModule

from leapc.ir.adapter import AdapterConfig, KangarooAdapter
from leapc.ir.capture import CapturedProgram
from leapc.ir.early_exit import slice_head
from leapc.models import corpus
from leapc.models.adapter import (
    AdapterReport,
    holds_adapter,
    load_adapter,
    save_adapter,
)
from leapc.models.loaders import SourceModel, weights_sha256
from leapc.models.training import StepLoss, cosine_lr, extend_greedily, resume, run_steps

console = Console()


@dataclass(frozen=True)
class AdapterTraining:
    context: int = 256
    batch_size: int = 8
    steps: int = 400
    lr: float = 2e-3
    min_lr: float = 2e-4
    seed: int = 0
    sequences: int = 256  # self-generated training sequences
    prompt_tokens: int = 32  # each a window of the corpus, continued greedily by the model
    eval_sequences: int = 16  # the same, from held-out files


def adapter_config(model) -> AdapterConfig:
    """One attention block shaped like the model's (heads, KV heads, head size, RoPE)."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or {}
    return AdapterConfig(hidden_size=text.hidden_size, num_heads=heads,
                         num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                         head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
                         rope_theta=float(rope.get("rope_theta", 10000.0)))


class _Exit(torch.nn.Module):
    """Adapter then head over whole sequences (an empty past, causal mask)."""

    def __init__(self, adapter: KangarooAdapter, head: GraphModule):
        super().__init__()
        self.adapter, self.head = adapter, head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden.shape
        c = self.adapter.config
        positions = torch.arange(n).expand(b, n)
        past = hidden.new_zeros(1, 2, b, c.num_kv_heads, 0, c.head_dim)
        mask = torch.ones(n, n, dtype=torch.bool).tril().expand(b, n, n)
        adapted, _ = self.adapter(hidden, positions, past, mask)
        return self.head(adapted, positions, past, mask)[0]


@torch.no_grad()
def _teacher(model, x: torch.Tensor, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h_E (the residual stream entering layer E) and the model's log-probabilities."""
    out = model(input_ids=x, output_hidden_states=True)
    return out.hidden_states[exit_layer], F.log_softmax(out.logits.float(), dim=-1)


@torch.no_grad()
def agreement(model, student: _Exit, sequences: torch.Tensor, exit_layer: int) -> float:
    """Share of positions where the exit's argmax is the model's."""
    hits = total = 0
    for x in sequences.split(4):
        hidden, teacher = _teacher(model, x, exit_layer)
        hits += int((student(hidden).argmax(-1) == teacher.argmax(-1)).sum())
        total += teacher.shape[0] * teacher.shape[1]
    return hits / total


def _lr(config: AdapterTraining, step: int) -> float:
    return cosine_lr(step, config.steps, config.lr, config.min_lr, max(1, config.steps // 20))


def _sequences(source: SourceModel, count: int, held_out: bool, config: AdapterTraining,
               file: Path) -> torch.Tensor:
    """Greedy continuations of corpus windows, cached in ``file`` for a resumed run."""
    if file.exists():
        return torch.load(file)
    texts = [f.text for f in corpus.read_stdlib() if f.held_out == held_out]
    prompts = corpus.text_windows(source.tokenizer, texts, count, config.prompt_tokens,
                                  seed=config.seed + held_out)
    rows = extend_greedily(source.model, torch.tensor(prompts), config.context)
    torch.save(rows, file)
    return rows


def train_adapter(source: SourceModel, program: CapturedProgram, exit_layer: int,
                  config: AdapterTraining, work: Path) -> tuple[KangarooAdapter, AdapterReport]:
    """Train an adapter at ``exit_layer`` of ``source`` (frozen); resumable in ``work``."""
    torch.manual_seed(config.seed)
    work.mkdir(parents=True, exist_ok=True)
    model = source.model.eval().requires_grad_(False)
    console.print(f"adapter at layer {exit_layer}: generating {config.sequences} + "
                  f"{config.eval_sequences} continuations of {config.context} tokens")
    texts = _sequences(source, config.sequences, False, config, work / "train.pt")
    held = _sequences(source, config.eval_sequences, True, config, work / "held_out.pt")
    adapter = KangarooAdapter(adapter_config(model))
    student = _Exit(adapter, slice_head(program).requires_grad_(False))
    before = agreement(model, student, held, exit_layer)
    opt = torch.optim.AdamW(adapter.parameters(), lr=config.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    state = resume(work / "adapter.pt", adapter, opt, {"step": 0, "tokens": 0, "seconds": 0.0})

    def loss_at(step: int, rng: np.random.Generator) -> StepLoss:
        x = texts[rng.integers(0, len(texts), size=config.batch_size)]
        hidden, teacher = _teacher(model, x, exit_layer)
        log_q = F.log_softmax(student(hidden), dim=-1)
        kl = (teacher.exp() * (teacher - log_q)).sum(-1).mean()
        return StepLoss(kl, x.numel(), f"KL {kl.item():.3f}")

    run_steps("kangaroo adapter", adapter, opt, config.steps, lambda s: _lr(config, s),
              loss_at, work / "adapter.pt", state, config.seed, save_every=50, console=console)
    after = agreement(model, student.eval(), held, exit_layer)
    console.print(f"held-out exit agreement with the model: {before:.3f} -> {after:.3f}")
    return adapter.eval(), AdapterReport(steps=state["step"], seconds=round(state["seconds"], 1),
                                         agreement_before=round(before, 4),
                                         agreement_after=round(after, 4),
                                         training=asdict(config))


def trained_adapter(source: SourceModel, program: CapturedProgram, exit_layer: int,
                    directory: Path,
                    config: AdapterTraining) -> tuple[KangarooAdapter, AdapterReport]:
    """The adapter ``directory`` holds for this model and exit, or one trained into it."""
    fingerprint = weights_sha256(source.model)
    if holds_adapter(directory):
        return load_adapter(directory, exit_layer, fingerprint)
    work = directory / "training"
    adapter, report = train_adapter(source, program, exit_layer, config, work)
    save_adapter(adapter, exit_layer, fingerprint, report, directory)
    shutil.rmtree(work)
    return adapter, report


def main(
    exit_layer: int = typer.Option(..., help="the exit layer E the adapter reads"),
    out: Path = typer.Option(..., help="directory to train into (reused if it holds one)"),
    steps: int = typer.Option(0, help="optimizer steps (0 = the default)"),
    threads: int = typer.Option(0, help="torch threads (0 = all cores)"),
) -> None:
    """Train an adapter for the bundled model."""
    from leapc.ir.capture import capture
    from leapc.models.loaders import load_source

    if threads:
        torch.set_num_threads(threads)
    source = load_source("bundled")
    config = AdapterTraining(**({"steps": steps} if steps else {}))
    trained_adapter(source, capture(source.model), exit_layer, out, config)


if __name__ == "__main__":
    typer.run(main)
