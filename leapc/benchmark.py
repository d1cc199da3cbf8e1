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

from rich.table import Table

from leapc.ir.errors import InputError, require_utf8
from leapc.runtime.decode import GenerationStats
from leapc.runtime.engine import Engine, Generation
from leapc.runtime.policies import DraftOptions

CODE_PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def read_lines(filename):\n    with open(filename) as f:\n",
    "    def __repr__(self):\n        return",
    "for i in range(len(items)):\n    if",
)


@dataclass(frozen=True)
class PolicyRun:
    """One benchmarked configuration: a policy with its drafting options, under a label."""

    label: str
    policy: str
    draft: DraftOptions = DraftOptions()


@dataclass(frozen=True)
class BenchConfig:
    policies: tuple[str, ...]  # each run with ``draft``
    prompts: tuple[str, ...]
    max_new_tokens: int = 64
    repeats: int = 3
    draft: DraftOptions = DraftOptions()
    variants: tuple[PolicyRun, ...] = ()  # further labelled configurations

    def runs(self) -> list[PolicyRun]:
        """``ar`` first (the reference), then every configuration once."""
        named = [PolicyRun(p, p, self.draft) for p in self.policies if p != "ar"]
        return [PolicyRun("ar", "ar"), *named, *self.variants]

    def options_for(self, policy: str) -> DraftOptions:
        return next((r.draft for r in self.runs() if r.policy == policy), self.draft)


def load_prompts(path: Path | None, default: tuple[str, ...] = CODE_PROMPTS) -> tuple[str, ...]:
    """A JSONL file: each line a JSON string or an object with a string ``prompt`` field."""
    if path is None:
        return default
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise InputError(f"prompt file {path} cannot be read ({err.strerror})") from None
    # split on newlines only: JSON strings may hold U+2028 and the like, which splitlines cuts
    prompts = tuple(_prompt(line, f"{path}:{number}")
                    for number, line in enumerate(text.split("\n"), 1) if line.strip())
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts")
    return prompts


def _prompt(line: str, where: str) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError:
        raise InputError(f"{where}: not a JSON line") from None
    prompt = item.get("prompt") if isinstance(item, dict) else item
    if not isinstance(prompt, str):
        raise InputError(f'{where}: expected a JSON string or an object with a "prompt" string')
    return require_utf8(prompt, where)


def _run_pass(engine: Engine, run: PolicyRun, cfg: BenchConfig) -> tuple[list[Generation], float]:
    """One pass over the prompts; returns the generations and the tokens/s of the pass."""
    gens = [engine.generate(p, cfg.max_new_tokens, policy=run.policy, draft=run.draft)
            for p in cfg.prompts]
    tokens = sum(g.stats.new_tokens for g in gens)
    seconds = sum(g.stats.prefill_s + g.stats.decode_s for g in gens)
    return gens, tokens / seconds


def _timed_runs(engine: Engine, cfg: BenchConfig) -> dict[str, tuple[list[Generation], list[float]]]:
    """Repeats interleaved across configurations (noise hits them all alike); each is
    warmed up once first. Returns the last pass's generations and every pass's speed."""
    runs = cfg.runs()
    for run in runs:
        engine.generate(cfg.prompts[0], cfg.max_new_tokens, policy=run.policy, draft=run.draft)
    timed = {run.label: ([], []) for run in runs}
    for _ in range(cfg.repeats):
        for run in runs:
            gens, tps = _run_pass(engine, run, cfg)
            timed[run.label] = (gens, [*timed[run.label][1], tps])
    return timed


def _row(run: PolicyRun, gens: list[Generation], speeds: list[float], reference) -> dict:
    steps = sum(g.stats.steps for g in gens)
    new = sum(g.stats.new_tokens for g in gens)
    merged = GenerationStats(run.policy)
    for g in gens:
        merged.drafted_depth += g.stats.drafted_depth
        merged.accepted_depth += g.stats.accepted_depth
        merged.emitted_per_step += g.stats.emitted_per_step
    return {
        "policy": run.label,
        "tokens_per_s": statistics.median(speeds),
        "tau": new / steps if steps else 0.0,
        "steps": steps,
        "identical_to_ar": [g.token_ids for g in gens] == reference,
        "per_depth_acceptance": merged.per_depth_acceptance(),
        "emitted_histogram": _histogram(merged.emitted_per_step),
    }


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
    policies = {run.policy for run in cfg.runs()}
    if "lookup" in policies:
        lookup = cfg.options_for("lookup").draft_length()
        tps, _ = median_of_repeats(prompt_lookup_num_tokens=max(lookup, 1))
        baselines["hf_prompt_lookup_tokens_per_s"] = tps
    if "draft" in policies and engine.manifest.draft_model is not None:
        assistant = load_source(engine.manifest.draft_model.source).model
        tps, _ = median_of_repeats(assistant_model=assistant)
        baselines["hf_assisted_tokens_per_s"] = tps
    if "early-exit" in policies and engine.manifest.exit_layer is not None:
        tps, _ = median_of_repeats(assistant_early_exit=engine.manifest.exit_layer)
        baselines["hf_assistant_early_exit_tokens_per_s"] = tps
    return baselines


def run_bench(engine: Engine, cfg: BenchConfig, vs_hf: bool = False) -> dict:
    """The `leapc bench` JSON: one row per policy plus the baselines, same run."""
    for prompt in cfg.prompts:  # a prompt the engine refuses fails now, not mid-benchmark
        engine.encode(prompt)
    timed = _timed_runs(engine, cfg)
    reference = [g.token_ids for g in timed["ar"][0]]
    rows = [_row(run, *timed[run.label], reference) for run in cfg.runs()]
    ar_speed = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_ar"] = row["tokens_per_s"] / ar_speed
    if "ar" not in cfg.policies:
        rows = rows[1:]
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


def bench_table(result: dict) -> Table:
    """`run_bench`'s result as the table `leapc bench` and `leapc demo` print."""
    table = Table(title=f"{result['model']} · {result['backend']} · {result['prompts']} prompts "
                        f"× {result['max_new_tokens']} tokens (median of {result['repeats']})")
    for column in ("policy", "tokens/s", "tau", "steps", "speedup vs ar", "identical to ar"):
        table.add_column(column, justify="right")
    for r in result["results"]:
        table.add_row(r["policy"], f"{r['tokens_per_s']:.1f}", f"{r['tau']:.2f}", str(r["steps"]),
                      f"{r['speedup_vs_ar']:.2f}×", "yes" if r["identical_to_ar"] else "NO")
    for key, label, policy in (("hf_generate_tokens_per_s", "hf generate", "ar"),
                               ("hf_prompt_lookup_tokens_per_s", "hf prompt lookup", "lookup"),
                               ("hf_assisted_tokens_per_s", "hf assisted", "draft")):
        hf = result["baselines"].get(key)
        ours = next((r for r in result["results"] if r["policy"] == policy), None)
        if hf:
            ratio = f"({policy} is {ours['tokens_per_s'] / hf:.2f}× this)" if ours else ""
            table.add_row(label, f"{hf:.1f}", "", "", ratio, "")
    return table


def save_results(directory: Path, name: str, data, caption: str, table: str) -> None:
    """Write ``name.json`` (the data) and ``name.md`` (the caption, then the markdown
    table) into ``directory``, and print the table: what every bench script records."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(data, indent=2))
    (directory / f"{name}.md").write_text(f"{caption}\n\n{table}\n")
    print(table)

