"""One resumable training loop for every CPU recipe (base model, draft model, and later
heads and adapters): learning-rate schedule, clipped AdamW steps, a rich progress bar,
and a checkpoint of model, optimizer and loop state every ``save_every`` steps, from
which a stopped run carries on where it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepLoss(NamedTuple):
    loss: torch.Tensor  # what to minimise
    tokens: int  # tokens the step read
    info: str  # what the progress bar shows


def cosine_lr(step: int, steps: int, lr: float, min_lr: float, warmup: int = 0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def extend_greedily(model: torch.nn.Module, prompts: torch.Tensor, width: int,
                    batch: int = 32) -> torch.Tensor:
    """``[count, width]``: each prompt row continued by the model's greedy decoding (EOS
    suppressed, so every row is full length; bf16 autocast)."""
    rows, new = [], max(width - prompts.shape[1], 1)
    for chunk in prompts.split(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(chunk, attention_mask=torch.ones_like(chunk), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        rows.append(out[:, :width])
    return torch.cat(rows)


def resume(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           fresh: dict) -> dict:
    """The loop state saved in ``checkpoint`` (model and optimizer restored), or ``fresh``."""
    if not checkpoint.exists():
        return fresh
    saved = torch.load(checkpoint, weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["opt"])
    return saved["state"]


def run_steps(label: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              steps: int, lr_at: Callable[[int], float],
              loss_at: Callable[[int, np.random.Generator], StepLoss], checkpoint: Path,
              state: dict, seed: int, save_every: int, console: Console) -> dict:
    """Train from ``state["step"]`` to ``steps``; returns the updated state (which counts
    ``step``, ``tokens`` and ``seconds``). The batch generator is seeded by the step a run
    starts at, so a resumed run draws fresh batches rather than the first ones again."""
    rng = np.random.default_rng([seed, state["step"]])
    columns = (TextColumn(f"[bold]{label}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=steps, completed=state["step"], info="")
        while state["step"] < steps:
            step, start = state["step"], time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            result = loss_at(step, rng)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            state["step"] += 1
            state["tokens"] += result.tokens
            state["seconds"] += time.perf_counter() - start
            bar.update(task, advance=1, info=result.info)
            if state["step"] % save_every == 0 or state["step"] == steps:
                torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(),
                            "state": state}, checkpoint)
    return state
