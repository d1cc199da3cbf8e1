"""Measure policies on an engine (and optionally transformers' own generate) in one run.

Speed numbers are medians over repeats of end-to-end tokens/s (new tokens over prefill +
decode time, summed over the prompt set), each policy warmed up once first.
"""

from __future__ import annotations

import collections
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from leapc.ir.errors import InputError
from leapc.runtime.decode import GenerationStats
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
    merged = GenerationStats(policy)
    for g in gens:
        merged.drafted_depth += g.stats.drafted_depth
        merged.accepted_depth += g.stats.accepted_depth
        merged.emitted_per_step += g.stats.emitted_per_step
    return {
        "policy": policy,
        "tokens_per_s": statistics.median(speeds),
        "tau": new / steps if steps else 0.0,
        "steps": steps,
        "identical_to_ar": ids == (reference if reference is not None else ids),
        "per_depth_acceptance": merged.per_depth_acceptance(),
        "emitted_histogram": _histogram(merged.emitted_per_step),
    }, ids


def _histogram(values: list[int]) -> dict[str, int]:
    """Tokens emitted per target call -> how many calls emitted that many."""
    counts = collections.Counter(values)
    return {str(k): counts[k] for k in sorted(counts)}


def hf_baselines(engine: Engine, cfg: BenchConfig) -> dict:
    """transformers ``generate()`` on the engine's source model, same prompts, same process:
    greedy always; prompt lookup (``prompt_lookup_num_tokens``) when ``lookup`` is benched;
    assisted generation (``assistant_model``: the engine's draft model) when ``draft`` is."""
    import torch

    from leapc.models.loaders import load_source, weights_sha256

    source = load_source(engine.manifest.model.source)
    if weights_sha256(source.model) != engine.manifest.model.weights_sha256:
        raise InputError(f"--vs-hf: {engine.manifest.model.source} no longer has the weights "
                         "this engine was built from")
    prompts = [engine.encode(p) for p in cfg.prompts]
    pad = source.eos_ids[0] if source.eos_ids else 0

    def one_pass(**options) -> tuple[list[list[int]], float]:
        outs, seconds = [], 0.0
        for ids in prompts:
            x = torch.tensor([ids])
            start = time.perf_counter()
            with torch.inference_mode():
                y = source.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                          max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                                          **options)
            seconds += time.perf_counter() - start
            outs.append(y[0, len(ids):].tolist())
        return outs, sum(len(o) for o in outs) / seconds

    def median_of_repeats(**options) -> tuple[float, list[list[int]]]:
        one_pass(**options)  # warm-up
        runs = [one_pass(**options) for _ in range(cfg.repeats)]
        return statistics.median(r[1] for r in runs), runs[-1][0]

    greedy_tps, greedy_ids = median_of_repeats()
    baselines = {"hf_generate_tokens_per_s": greedy_tps, "_hf_ids": greedy_ids}
    if "lookup" in cfg.policies:
        tps, _ = median_of_repeats(prompt_lookup_num_tokens=max(cfg.draft.max_draft, 1))
        baselines["hf_prompt_lookup_tokens_per_s"] = tps
    if "draft" in cfg.policies and engine.manifest.draft_model is not None:
        assistant = load_source(engine.manifest.draft_model.source).model
        tps, _ = median_of_repeats(assistant_model=assistant)
        baselines["hf_assisted_tokens_per_s"] = tps
    return baselines


def run_bench(engine: Engine, cfg: BenchConfig, vs_hf: bool = False) -> dict:
    """The `leapc bench` JSON: one row per policy plus the baselines, same run."""
    ar_row, reference = _policy_row(engine, "ar", cfg, None)
    rows = [ar_row] if "ar" in cfg.policies else []
    rows += [_policy_row(engine, p, cfg, reference)[0] for p in cfg.policies if p != "ar"]
    for row in rows:
        row["speedup_vs_ar"] = row["tokens_per_s"] / ar_row["tokens_per_s"]
    baselines = {}
    if vs_hf:
        baselines = hf_baselines(engine, cfg)
        baselines["hf_identical_to_ar"] = baselines.pop("_hf_ids") == reference
    return {
        "model": engine.manifest.model.source,
        "backend": engine.manifest.backend.value,
        "prompts": len(cfg.prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "repeats": cfg.repeats,
        "results": rows,
        "baselines": baselines,
    }
