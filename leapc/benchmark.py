"""Measure policies on an engine (and optionally transformers' own generate) in one run.

Speed numbers are medians over repeats of end-to-end tokens/s (new tokens over prefill +
decode time, summed over the prompt set), each policy warmed up once first.
"""

from __future__ import annotations

import collections
import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from leapc.ir.errors import InputError, MissingDependencyError, require_utf8
from leapc.runtime.decode import GenerationStats, StopConfig
from leapc.runtime.diffusion import DiffusionOptions
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
        merged.prefill_s += g.stats.prefill_s
        merged.decode_s += g.stats.decode_s
        merged.program_s += g.stats.program_s
        merged.calls += g.stats.calls
        merged.new_tokens += g.stats.new_tokens
    return {
        "policy": run.label,
        "ran": gens[0].stats.policy,  # ``auto``'s tuned choice; the label's policy otherwise
        "tokens_per_s": statistics.median(speeds),
        "tau": new / steps if steps else 0.0,
        "steps": steps,
        "identical_to_ar": [g.token_ids for g in gens] == reference,
        "per_depth_acceptance": merged.per_depth_acceptance(),
        "emitted_histogram": _histogram(merged.emitted_per_step),
        "overhead_share": merged.overhead_share,  # the last pass's, over every prompt
        "calls_per_token": merged.calls_per_token,
        "calls": dict(merged.calls),
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


# llama.cpp baselines: (key prefix in the bench JSON, GGUF variant, table label).
LLAMACPP_VARIANTS = (("llamacpp", "f32", "llama.cpp f32"),
                     ("llamacpp_bf16", "bf16", "llama.cpp bf16"),
                     ("llamacpp_q8", "q8_0", "llama.cpp q8_0"))


def require_llamacpp():
    """The ``llama_cpp`` module (llama-cpp-python), after checking ``gguf`` is there too;
    a `MissingDependencyError` naming the extra otherwise."""
    from leapc.gguf_export import require_gguf

    require_gguf()
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise MissingDependencyError("--vs-llamacpp needs llama-cpp-python (not installed): "
                                     "pip install 'leapc[llamacpp]'") from None
    return llama_cpp


def _source_of(engine: Engine, option: str):
    """The engine's source model, checked to still hold the weights it was built from."""
    from leapc.models.loaders import load_source, weights_sha256

    source = load_source(engine.manifest.model.source)
    if weights_sha256(source.model) != engine.manifest.model.weights_sha256:
        raise InputError(f"{option}: {engine.manifest.model.source} no longer has the weights "
                         "this engine was built from")
    return source


def llamacpp_ggufs(engine: Engine) -> dict[str, Path]:
    """The engine's source weights as GGUFs, one per `LLAMACPP_VARIANTS` entry (written into
    the GGUF cache once, never into the engine directory)."""
    from leapc.gguf_export import LLAMA_LIKE, GGUFType, cached_gguf, check_llama_like

    require_llamacpp()
    family = engine.manifest.model.family
    if family not in LLAMA_LIKE:  # before loading any weights
        raise InputError(f"--vs-llamacpp: the GGUF writer handles Llama-architecture models "
                         f"({', '.join(LLAMA_LIKE)}); this engine's model is {family!r}")
    source = _source_of(engine, "--vs-llamacpp")
    check_llama_like(source.model)
    return {prefix: cached_gguf(source, engine.manifest.model.weights_sha256, GGUFType(kind),
                                source.trained_positions or engine.manifest.max_seq)
            for prefix, kind, _ in LLAMACPP_VARIANTS}


@contextlib.contextmanager
def _without_weight_repacking(llama_cpp):
    """Load models with ``use_extra_bufts`` off: llama.cpp repacks Q8_0 weights into its
    "extra buffer types" for its AVX-512 kernels, and on this machine (Zen 5,
    llama-cpp-python 0.3.36) any batch of more than one token then segfaults inside
    ``llama_decode`` (one-token batches and F32 weights, which are never repacked, run).
    ``Llama()`` has no switch for it, so its default model parameters are wrapped while it
    loads. The q8_0 baseline is therefore llama.cpp without repacking (`bench` records it)."""
    bindings = llama_cpp.llama_cpp  # the ctypes module ``Llama`` calls
    default = bindings.llama_model_default_params

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


class LlamaCppGreedy:
    """A GGUF loaded in llama.cpp (llama-cpp-python), decoding greedily from token ids.

    The f32 variant keeps its KV cache in float32 (the engine's precision: its tokens can
    match `ar` exactly); quantized ones keep llama.cpp's default (float16)."""

    def __init__(self, path: Path, max_seq: int, batch: int, f32_cache: bool = True,
                 threads: int | None = None):
        from leapc.runtime.backends.base import thread_count

        llama_cpp = require_llamacpp()
        self.threads = threads or thread_count()
        batch = max(1, min(batch, max_seq))
        cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} \
            if f32_cache else {}
        self.kv_cache = "f32" if f32_cache else "f16"
        with _without_weight_repacking(llama_cpp):
            self.llm = llama_cpp.Llama(str(path), n_ctx=max_seq, n_batch=batch, n_ubatch=batch,
                                       n_threads=self.threads, n_threads_batch=self.threads,
                                       logits_all=False, verbose=False, **cache)
        self._logits = llama_cpp.llama_get_logits_ith
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        """Greedy: the argmax of the last evaluated token's logits (ties: the lowest id)."""
        row = np.ctypeslib.as_array(self._logits(self.llm.ctx, -1), shape=(self.vocab,))
        return int(row.argmax())

    def generate(self, ids: list[int], stop: StopConfig, max_seq: int) -> tuple[list[int], float]:
        """Tokens after ``ids``, cut by leapc's stop rule (EOS included, the token budget,
        prompt + output = max_seq), and the seconds prefill + decode took."""
        self.llm.reset()  # the next eval drops the previous prompt's KV cells
        room = max_seq - len(ids)
        out: list[int] = []
        start = time.perf_counter()
        self.llm.eval(ids)
        while True:
            token = self._next()
            out.append(token)
            if token in stop.eos_ids or len(out) >= min(stop.max_new_tokens, room):
                break
            self.llm.eval([token])
        return out, time.perf_counter() - start

    def close(self) -> None:
        self.llm.close()


def llamacpp_baselines(engine: Engine, cfg: BenchConfig, ggufs: dict[str, Path],
                       reference: list[list[int]]) -> dict:
    """llama.cpp's greedy decoding of each GGUF in ``ggufs`` (prefix -> path), same prompts
    (the engine's token ids), same stop rule; timed like `hf_baselines` (prefill + decode
    per prompt, summed; one warm-up pass, then the median of ``cfg.repeats`` passes,
    interleaved across the GGUFs). Token ids are compared with ``reference`` (`ar`'s):
    ``<prefix>_first_difference`` holds, per prompt, None where the outputs are identical,
    else the index of the first differing token (= the tokens that matched before it)."""
    import llama_cpp

    prompts = [engine.encode(p) for p in cfg.prompts]
    stop = StopConfig(cfg.max_new_tokens, engine.manifest.tokenizer.eos_ids)
    max_seq = engine.manifest.max_seq
    runners = {prefix: LlamaCppGreedy(path, max_seq, max(len(p) for p in prompts),
                                      f32_cache=prefix == "llamacpp")
               for prefix, path in ggufs.items()}

    def one_pass(runner: LlamaCppGreedy) -> tuple[list[list[int]], float]:
        outs = [runner.generate(ids, stop, max_seq) for ids in prompts]
        return [o for o, _ in outs], sum(len(o) for o, _ in outs) / sum(s for _, s in outs)

    try:
        for runner in runners.values():
            one_pass(runner)  # warm-up
        speeds: dict[str, list[float]] = {prefix: [] for prefix in runners}
        last: dict[str, list[list[int]]] = {}
        for _ in range(cfg.repeats):
            for prefix, runner in runners.items():
                last[prefix], tps = one_pass(runner)
                speeds[prefix].append(tps)
    finally:
        for runner in runners.values():
            runner.close()
    some = next(iter(runners.values()), None)
    baselines: dict = {"llamacpp_version": llama_cpp.__version__,
                       "llamacpp_threads": some.threads if some else None,
                       "llamacpp_weight_repacking": False}  # `_without_weight_repacking`
    for prefix, runner in runners.items():
        baselines[f"{prefix}_tokens_per_s"] = statistics.median(speeds[prefix])
        baselines[f"{prefix}_identical_to_ar"] = last[prefix] == reference
        baselines[f"{prefix}_first_difference"] = [
            _first_difference(ours, theirs)
            for ours, theirs in zip(reference, last[prefix], strict=True)]
        baselines[f"{prefix}_kv_cache"] = runner.kv_cache
    return baselines


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (one ending first counts); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def run_bench(engine: Engine, cfg: BenchConfig, vs_hf: bool = False,
              vs_llamacpp: bool = False) -> dict:
    """The `leapc bench` JSON: one row per policy plus the baselines, same run."""
    for prompt in cfg.prompts:  # a prompt the engine refuses fails now, not mid-benchmark
        engine.encode(prompt)
    # GGUFs are written (or the request refused) before any timing; llama.cpp loads them
    # only after leapc is timed (its thread pool must not share the cores with ORT's).
    ggufs = llamacpp_ggufs(engine) if vs_llamacpp else {}
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
    if vs_llamacpp:
        baselines.update(llamacpp_baselines(engine, cfg, ggufs, reference))
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
    for column in ("policy", "tokens/s", "tau", "steps", "calls/token", "loop overhead",
                   "speedup vs ar", "identical to ar"):
        table.add_column(column, justify="right")
    for r in result["results"]:
        label = r["policy"] if r["ran"] == r["policy"] else f"{r['policy']} ({r['ran']})"
        table.add_row(label, f"{r['tokens_per_s']:.1f}", f"{r['tau']:.2f}", str(r["steps"]),
                      f"{r['calls_per_token']:.2f}", f"{100 * r['overhead_share']:.0f}%",
                      f"{r['speedup_vs_ar']:.2f}×", "yes" if r["identical_to_ar"] else "NO")
    for key, label, policy in (("hf_generate_tokens_per_s", "hf generate", "ar"),
                               ("hf_prompt_lookup_tokens_per_s", "hf prompt lookup", "lookup"),
                               ("hf_assisted_tokens_per_s", "hf assisted", "draft")):
        hf = result["baselines"].get(key)
        ours = next((r for r in result["results"] if r["policy"] == policy), None)
        if hf:
            ratio = f"({policy} is {ours['tokens_per_s'] / hf:.2f}× this)" if ours else ""
            table.add_row(label, f"{hf:.1f}", "", "", "", "", ratio, "")
    ar = next((r for r in result["results"] if r["policy"] == "ar"), None)
    for prefix, _, label in LLAMACPP_VARIANTS:
        tps = result["baselines"].get(f"{prefix}_tokens_per_s")
        if tps:
            ratio = f"(ar is {ar['tokens_per_s'] / tps:.2f}× this)" if ar else ""
            differ = [d for d in result["baselines"][f"{prefix}_first_difference"]
                      if d is not None]
            same = ("yes" if result["baselines"][f"{prefix}_identical_to_ar"]
                    else f"NO ({len(differ)}/{result['prompts']} prompts, "
                         f"first at token {min(differ)})")
            table.add_row(label, f"{tps:.1f}", "", "", "", "", ratio, same)
    return table


def save_results(directory: Path, name: str, data, caption: str, table: str) -> None:
    """Write ``name.json`` (the data) and ``name.md`` (the caption, then the markdown
    table) into ``directory``, and print the table: what every bench script records."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(data, indent=2))
    (directory / f"{name}.md").write_text(f"{caption}\n\n{table}\n")
    print(table)



# ------------------------------------------------------------------ block diffusion


@dataclass(frozen=True)
class DiffusionRun:
    """One benchmarked block-diffusion configuration: a policy and its knobs, labelled."""

    label: str
    policy: str
    options: DiffusionOptions = DiffusionOptions()


def run_diffusion_bench(engine: Engine, runs: tuple[DiffusionRun, ...], prompts: tuple[str, ...],
                        max_new_tokens: int, repeats: int, scorer: Engine | None = None) -> dict:
    """Block-diffusion policies against ``mdm`` (the reference, run first), interleaved
    prompt by prompt: tokens/s (median), forward passes per token, identity with ``mdm`` and,
    for lossy rules, agreement with it; with ``scorer`` (an autoregressive engine on the
    same tokenizer), the cross-entropy of each output under that model."""
    runs = (DiffusionRun("mdm", "mdm"), *(r for r in runs if r.label != "mdm"))
    for prompt in prompts:
        engine.encode(prompt)
    generate = {r.label: (lambda p, r=r: engine.generate(p, max_new_tokens, policy=r.policy,
                                                          diffusion=r.options)) for r in runs}
    for run in runs:  # warm-up
        generate[run.label](prompts[0])
    # Interleaved per prompt, not per pass over the prompts: this shared machine's speed
    # drifts over seconds, and a pass of one policy takes several.
    speeds, last = {r.label: [] for r in runs}, {}
    for _ in range(repeats):
        gens = {r.label: [] for r in runs}
        for prompt in prompts:
            for run in runs:
                gens[run.label].append(generate[run.label](prompt))
        for label, done in gens.items():
            seconds = sum(g.stats.prefill_s + g.stats.decode_s for g in done)
            speeds[label].append(sum(len(g.token_ids) for g in done) / seconds)
        last = gens
    reference = [g.token_ids for g in last["mdm"]]
    rows = [_diffusion_row(run, last[run.label], speeds[run.label], reference, engine, prompts,
                           scorer) for run in runs]
    for row in rows:
        row["speedup_vs_mdm"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {"model": engine.manifest.model.source, "backend": engine.manifest.backend.value,
            "quantization": engine.manifest.quantization.value, "prompts": len(prompts),
            "max_new_tokens": max_new_tokens, "repeats": repeats, "results": rows}


def _diffusion_row(run: DiffusionRun, gens: list[Generation], speeds: list[float],
                   reference: list[list[int]], engine: Engine, prompts: tuple[str, ...],
                   scorer: Engine | None) -> dict:
    ids = [g.token_ids for g in gens]
    agree = [np.mean(np.asarray(a[: len(b)]) == np.asarray(b[: len(a)])) if a and b else 0.0
             for a, b in zip(ids, reference, strict=True)]
    row = {"policy": run.label, "tokens_per_s": statistics.median(speeds),
           "passes_per_token": sum(sum(g.stats.calls.values()) for g in gens)
           / max(1, sum(map(len, ids))),
           "identical_to_mdm": ids == reference, "agreement_with_mdm": float(np.mean(agree))}
    if scorer is not None:
        from leapc.quality import completion_loss

        row["ar_model_loss"] = float(np.mean([completion_loss(scorer, engine.encode(p), i)
                                              for p, i in zip(prompts, ids, strict=True) if i]))
    return row


def diffusion_table(result: dict) -> Table:
    table = Table(title=f"{result['model']} · {result['backend']} {result['quantization']} · "
                        f"{result['prompts']} prompts × {result['max_new_tokens']} tokens "
                        f"(median of {result['repeats']})")
    scored = "ar_model_loss" in result["results"][0]
    for column in ("policy", "tokens/s", "× mdm", "passes/token", "identical to mdm",
                   "agreement with mdm", *(("AR-model loss",) if scored else ())):
        table.add_column(column, justify="right")
    for r in result["results"]:
        table.add_row(r["policy"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_mdm']:.2f}×",
                      f"{r['passes_per_token']:.2f}", "yes" if r["identical_to_mdm"] else "no",
                      f"{r['agreement_with_mdm']:.1%}",
                      *((f"{r['ar_model_loss']:.3f}",) if scored else ()))
    return table
