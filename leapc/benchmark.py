"""Measure policies on an engine (and optionally transformers' own generate) in one run.

Speed numbers are medians over repeats of end-to-end tokens/s (new tokens over prefill +
decode time, summed over the prompt set), each policy warmed up once first.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from leapc.ir.errors import InputError
from leapc.runtime.engine import DraftOptions, Engine, Generation

CODE_PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def read_lines(filename):\n    with open(filename) as f:\n",
    "    def __repr__(self):\n        return",
    "for i in range(len(items)):\n    if",
)


@dataclass(frozen=True)
class BenchConfig:
    policies: tuple[str, ...]
    prompts: tuple[str, ...]
    max_new_tokens: int = 64
    repeats: int = 3
    draft: DraftOptions = DraftOptions()


def load_prompts(path: Path | None, default: tuple[str, ...] = CODE_PROMPTS) -> tuple[str, ...]:
    """A JSONL file: each line a JSON string or an object with a ``prompt`` field."""
    if path is None:
        return default
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{number}: not a JSON line") from None
        prompts.append(item["prompt"] if isinstance(item, dict) else str(item))
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts")
    return tuple(prompts)


def _run_policy(engine: Engine, policy: str, cfg: BenchConfig) -> tuple[list[Generation], float]:
    """One pass over the prompts; returns the generations and the tokens/s of the pass."""
    gens = [engine.generate(p, cfg.max_new_tokens, policy=policy, draft=cfg.draft)
            for p in cfg.prompts]
    tokens = sum(g.stats.new_tokens for g in gens)
    seconds = sum(g.stats.prefill_s + g.stats.decode_s for g in gens)
    return gens, tokens / seconds


def _policy_row(engine: Engine, policy: str, cfg: BenchConfig, reference) -> tuple[dict, list]:
    engine.generate(cfg.prompts[0], cfg.max_new_tokens, policy=policy, draft=cfg.draft)  # warm-up
    speeds, gens = [], []
    for _ in range(cfg.repeats):
        gens, tps = _run_policy(engine, policy, cfg)
        speeds.append(tps)
    steps = sum(g.stats.steps for g in gens)
    new = sum(g.stats.new_tokens for g in gens)
    ids = [g.token_ids for g in gens]
    return {
        "policy": policy,
        "tokens_per_s": statistics.median(speeds),
        "tau": new / steps if steps else 0.0,
        "steps": steps,
        "identical_to_ar": ids == (reference if reference is not None else ids),
    }, ids


def hf_generate_tokens_per_s(engine: Engine, cfg: BenchConfig) -> tuple[float, list[list[int]]]:
    """transformers ``generate(do_sample=False)`` on the engine's source model, same prompts."""
    import torch

    from leapc.models.loaders import load_source, weights_sha256

    source = load_source(engine.manifest.model.source)
    if weights_sha256(source.model) != engine.manifest.model.weights_sha256:
        raise InputError(f"--vs-hf: {engine.manifest.model.source} no longer has the weights "
                         "this engine was built from")
    model = source.model
    prompts = [engine.encode(p) for p in cfg.prompts]

    def one_pass():
        outs, seconds = [], 0.0
        for ids in prompts:
            x = torch.tensor([ids])
            start = time.perf_counter()
            with torch.inference_mode():
                y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=cfg.max_new_tokens,
                                   pad_token_id=source.eos_ids[0] if source.eos_ids else 0)
            seconds += time.perf_counter() - start
            outs.append(y[0, len(ids):].tolist())
        return outs, sum(len(o) for o in outs) / seconds

    one_pass()  # warm-up
    results = [one_pass() for _ in range(cfg.repeats)]
    return statistics.median(r[1] for r in results), results[-1][0]


def run_bench(engine: Engine, cfg: BenchConfig, vs_hf: bool = False) -> dict:
    """The `leapc bench` JSON: one row per policy plus the baselines, same run."""
    ar_row, reference = _policy_row(engine, "ar", cfg, None)
    rows = [ar_row] if "ar" in cfg.policies else []
    rows += [_policy_row(engine, p, cfg, reference)[0] for p in cfg.policies if p != "ar"]
    for row in rows:
        row["speedup_vs_ar"] = row["tokens_per_s"] / ar_row["tokens_per_s"]
    baselines = {}
    if vs_hf:
        hf_tps, hf_ids = hf_generate_tokens_per_s(engine, cfg)
        baselines = {"hf_generate_tokens_per_s": hf_tps, "hf_identical_to_ar": hf_ids == reference}
    return {
        "model": engine.manifest.model.source,
        "backend": engine.manifest.backend.value,
        "prompts": len(cfg.prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "repeats": cfg.repeats,
        "results": rows,
        "baselines": baselines,
    }
