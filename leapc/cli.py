"""The ``leapc`` command line: build, run, inspect, bench, demo.

User mistakes (bad flags, missing or corrupt engines, unsupported models, prompts that do
not fit) print one line on stderr and exit with code 2; nothing else is caught.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import warnings
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from leapc.ir.errors import InputError, LeapcUserError, MissingDependencyError, require_utf8
from leapc.ir.head_spec import HeadKind, HeadPlacement
from leapc.runtime.backends.base import Device
from leapc.runtime.decode import GenerationStats, StopReason
from leapc.runtime.diffusion import DiffusionOptions
from leapc.runtime.drafters.base import ChildSampling
from leapc.runtime.drafters.heads import DynamicTree
from leapc.runtime.drafters.lookahead import LookaheadConfig
from leapc.runtime.drafters.retrieval import RetrievalConfig
from leapc.runtime.manifest import Backend, Quantization
from leapc.runtime.policies import AUTO_POLICY, POLICIES, DraftOptions, Policy
from leapc.runtime.sampling import TypicalAcceptance


def _lookahead(text: str | LookaheadConfig) -> LookaheadConfig:
    if isinstance(text, LookaheadConfig):  # the default, already parsed
        return text
    try:
        window, ngram, guesses = (int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--lookahead takes W,N,G: three comma-separated integers "
                         f"(got {text!r})") from None
    return LookaheadConfig(window, ngram, guesses)


DeviceOption = Annotated[Device, typer.Option(
    help="ort engines: cpu, or the cuda / tensorrt execution provider (onnxruntime-gpu)")]


def _drafting(name: str, kind: object, default: object, help: str, **option) -> Parameter:
    option = typer.Option(rich_help_panel="Drafting (policies that draft)", help=help, **option)
    return Parameter(name, Parameter.KEYWORD_ONLY, default=default,
                     annotation=Annotated[kind, option])


# The drafting flags of `run` and `bench`, declared once: `_with_draft_options` adds them to
# a command, which receives them as one DraftOptions.
DRAFT_FLAGS = (
    _drafting("max_draft", int | None, None,
              "longest draft per step (drafting policies; default 8, early exit: the engine's)"),
    _drafting("ngram", int, 4, "lookup: longest n-gram matched"),
    _drafting("matches", int, 1,
              "lookup: continuations of this many earlier occurrences, verified as one tree"),
    _drafting("adaptive", bool, False, "chain drafts: +2/-1 adaptive draft length"),
    _drafting("draft_tree", str, "",
              "draft model: children per node at depths 1, 2, ... (e.g. 2,2; deeper is a "
              "chain)"),
    _drafting("confidence", float, 0.0,
              "draft model: stop expanding a node whose draft top-1 probability is below this"),
    _drafting("tree_sampling", ChildSampling, ChildSampling.WITHOUT_REPLACEMENT,
              "draft model, sampled trees: how siblings are drawn (rule 3 or rule 4)"),
    _drafting("lookahead", LookaheadConfig, LookaheadConfig(),
              "lookahead: window W, n-gram size N, n-grams kept and verified per token G",
              parser=_lookahead, metavar="W,N,G"),
    _drafting("retrieval_nodes", int, RetrievalConfig().nodes,
              "retrieval: draft nodes per step (context continuation and datastore together)"),
    _drafting("tree_nodes", int, DynamicTree().total,
              "medusa-dynamic / hydra-dynamic: drafted nodes kept per step"),
    _drafting("beam", int, DynamicTree().beam,
              "medusa-dynamic / hydra-dynamic: nodes expanded per depth, children per node"),
)


def _with_draft_options(command):
    """``command(..., draft: DraftOptions)`` as a typer command taking DRAFT_FLAGS: typer
    reads the signature, so the flags replace ``draft`` in it."""
    names = [flag.name for flag in DRAFT_FLAGS]

    @functools.wraps(command)
    def with_flags(**kwargs):
        flags = {name: kwargs.pop(name) for name in names}
        return command(**kwargs, draft=_draft_options(**flags))

    own = signature(command, eval_str=True).parameters.values()
    with_flags.__signature__ = Signature(
        [p.replace(kind=Parameter.KEYWORD_ONLY) for p in own if p.name != "draft"]
        + list(DRAFT_FLAGS))
    return with_flags

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="leapc: compile LLMs ahead of time for fast, lossless decoding.")
out = Console()
err = Console(stderr=True, soft_wrap=True)


def _policies(value: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in value.split(",") if p.strip())
    if not names:
        raise InputError(f"--policies names no policy (got {value!r}; e.g. ar,lookup)")
    known = [AUTO_POLICY, *(p.value for p in Policy)]
    for name in names:
        if name not in known:
            raise InputError(f"unknown policy {name!r} (known: {', '.join(known)})")
    return names


@app.command()
def build(
    model: str = typer.Argument(..., help="Hugging Face directory, llama2.c .bin, or 'bundled'"),
    output: Path = typer.Option(..., "-o", "--output", help="engine directory to write"),
    backend: Backend = typer.Option(Backend.ORT, help="engine backend"),
    attention: str = typer.Option(None, help="attention lowering: dense | tree | invariant "
                                             "| kernel (ort: rows the same in steps of any "
                                             "width; invariant up to 1024 keys, kernel is "
                                             "leapc's AVX-512 op and the default on int8; "
                                             "else the faster one on the backend)"),
    max_seq: int = typer.Option(None, help="longest sequence (prompt + generation)"),
    max_batch: int = typer.Option(8, help="most requests one step runs (leapc serve "
                                          "--max-batch)"),
    tokenizer: Path = typer.Option(None, help="tokenizer file, if not beside the model"),
    draft_model: str = typer.Option(None, help="draft model for --policy draft "
                                                "(HF dir, llama2.c .bin, or 'bundled-draft')"),
    draft_chain: bool = typer.Option(False, "--unroll-draft-chain",
                                     help="with --draft-model: one program call per greedy "
                                          "draft chain (~12%% less drafting time, minutes "
                                          "more build)"),
    datastore: list[str] = typer.Option(
        None, help="corpus for --policy retrieval: text files/directories (repeatable), or "
                   "'bundled' (the bundled model's training corpus)"),
    quantize: Quantization = typer.Option(
        Quantization.NONE, help="ort: int8 weights and activations in leapc's kernel "
                                "(AVX512-VNNI, compiled into the engine), bf16 weights with "
                                "float32 arithmetic in leapc's kernel, int8-nbits / int4 "
                                "in ONNX Runtime's MatMulNBits"),
    heads: int = typer.Option(0, help="add K decoding heads (policies medusa / hydra)"),
    head_kind: HeadKind = typer.Option(HeadKind.MEDUSA, help="medusa or hydra heads"),
    train_heads: list[Path] = typer.Option(
        None, help="train the heads on this text (files/directories, repeatable); "
                   "default: the heads the bundled model ships"),
    tree: str = typer.Option(None, help="static head tree: 'auto' (measured, Sequoia) or a "
                                        "JSON file of rank paths (default: hand-written)"),
    head_placement: HeadPlacement = typer.Option(
        HeadPlacement.PROGRAM, help="heads in their own program, or in the step program"),
    exit_layer: str = typer.Option(None, help="add an exit after layer E's input (1..L-1), or "
                                              "'auto' (the fastest measured): policies "
                                              "early-exit"),
    train_adapter: Path = typer.Option(
        None, help="Kangaroo's adapter at the exit: read from this directory if it holds "
                   "one for this model and exit, else trained into it (policy kangaroo)"),
    skip: str = typer.Option(None, help="sublayers the layer-skip draft bypasses: "
                                        "comma-separated layers (3), attention (a3) or MLP "
                                        "(m3) sublayers, or 'auto' (searched, then "
                                        "measured): policy layer-skip"),
    draft_vocab: int = typer.Option(None, help="draft programs propose only the K most "
                                               "frequent tokens of --draft-vocab-text (FR-Spec; "
                                               "output unchanged)"),
    draft_vocab_text: list[str] = typer.Option(
        None, help="text whose token frequencies choose --draft-vocab's tokens (files/"
                   "directories, repeatable; default: the bundled corpus)"),
    dump_passes: Path = typer.Option(None, help="write each pass's graph code here"),
    tune: bool = typer.Option(False, "--tune", help="measure the engine's policies on this "
                                                    "machine; --policy auto runs the fastest"),
    tune_prompts: Path = typer.Option(None, help="--tune on these prompts (JSONL; default: "
                                                 "built-in code prompts)"),
    force: bool = typer.Option(False, "--force", "--overwrite",
                               help="replace the engine at --output (never anything else)"),
) -> None:
    """Compile MODEL into an engine directory."""
    from leapc.benchmark import load_prompts
    from leapc.compiler import build as build_engine
    from leapc.compiler import planned_steps
    from leapc.early_exit import AdapterOptions
    from leapc.stage import BuildOptions

    if tune_prompts is not None and not tune:
        raise InputError("--tune-prompts needs --tune")

    # flags first: a mistake is one error line, not a progress bar and then the line
    options = BuildOptions.parse(
        backend, attention, quantize, _exit_layer(exit_layer), skip, max_seq=max_seq,
        max_batch=max_batch,
        tokenizer=tokenizer, draft_model=draft_model, draft_chain=draft_chain, datastore=_datastore_source(datastore),
        heads=_heads_options(heads, head_kind, train_heads, tree, head_placement),
        adapter=AdapterOptions(train_adapter) if train_adapter else None,
        dump_dir=dump_passes, tune_prompts=load_prompts(tune_prompts) if tune else None,
        draft_vocab=_draft_vocab(draft_vocab, draft_vocab_text))
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("build", total=planned_steps(options))

        def on_stage(stage: str) -> None:
            if bar.tasks[task].description != "build":
                bar.advance(task)
            bar.update(task, description=stage)

        path = build_engine(model, output, options, force=force, on_stage=on_stage)
    out.print(f"engine written to [bold]{path}[/]")


def _exit_layer(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--exit-layer must be a layer number or 'auto' (got {text!r})") from None


def _heads_options(count: int, kind: HeadKind, text: list[Path] | None, tree: str | None,
                   placement: HeadPlacement):
    from leapc.heads import HeadsOptions
    from leapc.stage import AUTO

    if count < 0:
        raise InputError(f"--heads must be 0 (none) or more (got {count})")
    if count == 0:
        if text or tree:
            raise InputError("--train-heads and --tree need --heads K")
        return None
    return HeadsOptions(count=count, kind=kind, train_text=list(text) if text else None,
                        tree=AUTO if tree == AUTO else Path(tree) if tree else None,
                        placement=placement)


def _draft_vocab(size: int | None, text: list[str] | None):
    from leapc.draft_vocabulary import DraftVocabularyOptions

    if size is None:
        if text:
            raise InputError("--draft-vocab-text needs --draft-vocab K")
        return None
    source = _datastore_source(text, "--draft-vocab-text")
    return DraftVocabularyOptions(size) if source is None else DraftVocabularyOptions(size, source)


def _datastore_source(values: list[str] | None,
                      flag: str = "--datastore") -> str | list[Path] | None:
    if not values:
        return None
    if "bundled" in values:
        if len(values) > 1:
            raise InputError(f"{flag} bundled cannot be combined with other sources")
        return "bundled"
    return [Path(v) for v in values]


@app.command()
@_with_draft_options
def run(
    engine: Path = typer.Argument(..., help="engine directory"),
    prompt: str = typer.Option(None, help="prompt text ('' means BOS only)"),
    prompt_ids: str = typer.Option(None, help="comma-separated prompt token ids"),
    max_new_tokens: int = typer.Option(64),
    policy: str = typer.Option(AUTO_POLICY, help="a policy the engine offers, or 'auto': the "
                                                 "one `build --tune` measured fastest (ar "
                                                 "if untuned; mdm on a block-diffusion "
                                                 "engine)"),
    temperature: float = typer.Option(0.0),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    typical: bool = typer.Option(
        False, help="sampling: Medusa's typical acceptance (lossy: output distribution changes)"),
    device: DeviceOption = Device.CPU,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    token_healing: bool = typer.Option(True, help="back the prompt up by its last token and "
                                                  "start with a token that begins with its "
                                                  "text (a prompt may end anywhere; "
                                                  "autoregressive policies)"),
    unmask_depth: int = typer.Option(DiffusionOptions.depth, help="freedave: reference "
                                     "decisions drafted and verified per call"),
    unmask_gate: float = typer.Option(DiffusionOptions.gate, help="freedave: draft past the "
                                      "first decision only while at least this probable"),
    unmask_threshold: float = typer.Option(DiffusionOptions.threshold, help="confidence: "
                                           "decide every position at least this probable"),
    unmask_margin: float = typer.Option(DiffusionOptions.margin, help="prophet: decide the "
                                        "whole block once every top-1 leads its top-2 by this"),
    unmask_credit: float = typer.Option(DiffusionOptions.credit, help="credit: decide "
                                        "positions whose accumulated probability reaches this"),
    draft: DraftOptions = None,
) -> None:
    """Generate from a prompt."""
    import leapc

    if (prompt is None) == (prompt_ids is None):
        raise InputError("give exactly one of --prompt and --prompt-ids")
    request = require_utf8(prompt, "--prompt") if prompt is not None else _prompt_ids(prompt_ids)
    loaded = leapc.load(engine, device, policies=[policy])
    stream = loaded.stream(request, max_new_tokens, policy=policy, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, draft=draft,
                           typical=TypicalAcceptance() if typical else None,
                           token_healing=token_healing,
                           diffusion=DiffusionOptions(depth=unmask_depth, gate=unmask_gate,
                                                      threshold=unmask_threshold,
                                                      margin=unmask_margin, credit=unmask_credit))
    if as_json:
        for _ in stream:
            pass
        print(json.dumps({"text": stream.text, "token_ids": stream.token_ids,
                          **stream.stats.as_dict()}))
        return
    for chunk in stream:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_stats(stream.stats, max_new_tokens, loaded.manifest.max_seq)


def _print_stats(stats: GenerationStats, max_new_tokens: int, max_seq: int) -> None:
    """One line on stderr: speed, and why generation stopped; plain (not dimmed) when the
    engine's context cut it short of --max-new-tokens (decode reports max_seq only then)."""
    reason, new = stats.stop_reason, stats.new_tokens
    cut_short = reason is StopReason.MAX_SEQ
    if cut_short:
        why = (f"stopped at max-seq {max_seq} (the engine's context) after {new} of "
               f"{max_new_tokens} tokens")
    elif reason is StopReason.EOS:
        why = "stopped at an end-of-sequence token"
    else:
        why = f"stopped at --max-new-tokens {max_new_tokens}"
    err.print(f"{new} tokens, {stats.tokens_per_s:.1f} tok/s, tau {stats.tau:.2f}; {why}",
              style=None if cut_short else "dim", markup=False, highlight=False)


def _prompt_ids(text: str) -> list[int]:
    ids = _parse_ids(text, "--prompt-ids")
    if not ids:
        raise InputError(f"--prompt-ids names no token id (got {text!r}; --prompt '' is "
                         "BOS only)")
    return ids


def _parse_ids(text: str, option: str) -> list[int]:
    """Comma-separated integers ("" is none); an empty item is a mistake, not skipped."""
    items = text.split(",") if text.strip() else []
    try:
        return [int(item) for item in items]
    except ValueError:
        raise InputError(f"{option} must be comma-separated integers (got {text!r})") from None


def _draft_options(max_draft: int | None, ngram: int, matches: int, adaptive: bool,
                   draft_tree: str, confidence: float, tree_sampling: ChildSampling,
                   lookahead: LookaheadConfig, retrieval_nodes: int, tree_nodes: int,
                   beam: int) -> DraftOptions:
    return DraftOptions(max_draft=max_draft, ngram=ngram, matches=matches, adaptive=adaptive,
                        branching=tuple(_parse_ids(draft_tree, "--draft-tree")),
                        confidence=confidence, children=tree_sampling, lookahead=lookahead,
                        retrieval=RetrievalConfig(nodes=retrieval_nodes),
                        dynamic=DynamicTree(tree_nodes, beam))


@app.command()
def serve(
    engine: Path = typer.Argument(..., help="engine directory"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    policy: str = typer.Option(AUTO_POLICY, help="the policy of requests that name none "
                                                 "(their 'leapc' field can)"),
    max_queue: int = typer.Option(64, help="requests queued or running; more get a 503"),
    max_batch: int = typer.Option(None, help="requests one step runs (continuous "
                                             "batching; default: the engine's bound)"),
    step_nodes: int = typer.Option(None, help="most nodes a step verifies over all its "
                                              "rows: drafts narrow as the batch fills"),
    model_name: str = typer.Option(None, help="the model id clients name (default: the "
                                              "engine directory's name)"),
    prefix_cache_mb: int = typer.Option(None, help="MB of prompt KV kept for requests that "
                                                   "share a prefix; 0: off (default: 256 "
                                                   "where the engine verifies exactly)"),
    device: DeviceOption = Device.CPU,
    ray: bool = typer.Option(False, "--ray", help="serve as Ray Serve replicas on a local "
                                                  "Ray instance (pip install 'leapc[ray]')"),
    replicas: int = typer.Option(1, help="with --ray: server processes, each with the "
                                         "engine loaded"),
) -> None:
    """Serve an engine over an OpenAI-compatible HTTP API (/v1/completions)."""
    import leapc

    try:
        import uvicorn

        from leapc.runtime.serving.app import DEFAULT_PREFIX_CACHE_MB, ServeConfig, create_app
    except ModuleNotFoundError as missing:
        raise MissingDependencyError(f"leapc serve needs {missing.name} (not installed): "
                                     "pip install 'leapc[serve]'") from None
    if max_queue < 1:
        raise InputError(f"--max-queue must be at least 1 (got {max_queue})")
    if replicas < 1:
        raise InputError(f"--replicas must be at least 1 (got {replicas})")
    if prefix_cache_mb is not None and prefix_cache_mb < 0:
        raise InputError(f"--prefix-cache-mb must be at least 0 (got {prefix_cache_mb})")
    loaded = leapc.load(engine, device, policies=[policy])
    if prefix_cache_mb is None:
        refusal = loaded.prefix_cache_refusal
        prefix_cache_mb = 0 if refusal else DEFAULT_PREFIX_CACHE_MB
        if refusal:
            out.print(f"prefix cache off: {refusal}")
    config = ServeConfig(model_name or engine.resolve().name, policy, max_queue, max_batch,
                         step_nodes, prefix_cache_mb)
    app = create_app(loaded, config)  # every refusal before anything listens
    alone = [p.value for p in loaded.manifest.policies if not POLICIES[p].batches]
    if alone:
        out.print(f"policies {', '.join(alone)} do not batch (they draft in the target's "
                  "KV cache): their requests run one at a time, between batches")
    if ray:
        try:
            from leapc.runtime.serving.ray_app import serve_forever
        except ModuleNotFoundError as missing:
            raise MissingDependencyError(f"leapc serve --ray needs {missing.name} (not "
                                         "installed): pip install 'leapc[ray]'") from None
        serve_forever(engine, config, replicas, host, port)
    else:
        uvicorn.run(app, host=host, port=port, log_level="warning")


@app.command()
def inspect(path: Path = typer.Argument(..., help="engine directory or model")) -> None:
    """Show anatomy, step signature, KV memory, passes and policies."""
    from leapc.inspection import inspect_target

    for table in inspect_target(path):
        out.print(table)


@app.command()
@_with_draft_options
def bench(
    engine: Path = typer.Argument(..., help="engine directory"),
    policies: str = typer.Option(f"ar,{AUTO_POLICY}", help="comma-separated policies ('auto': "
                                                          "the engine's tuned choice)"),
    prompts: Path = typer.Option(None, help="JSONL prompt file (default: built-in code prompts)"),
    max_new_tokens: int = typer.Option(64),
    repeats: int = typer.Option(3),
    device: DeviceOption = Device.CPU,
    vs_hf: bool = typer.Option(False, "--vs-hf", help="also time transformers generate()"),
    vs_llamacpp: bool = typer.Option(
        False, "--vs-llamacpp", help="also time llama.cpp greedy decoding (f32 and Q8_0 GGUFs "
                                     "of the source weights; pip install 'leapc[llamacpp]')"),
    json_out: Path = typer.Option(None, "--json", help="write the results as JSON"),
    plot: Path = typer.Option(None, help="write a speedup plot (PNG)"),
    draft: DraftOptions = None,
) -> None:
    """Benchmark policies on an engine (medians over repeats)."""
    import leapc
    from leapc.benchmark import BenchConfig, bench_table, load_prompts, run_bench

    if repeats < 1 or max_new_tokens < 1:
        raise InputError("--repeats and --max-new-tokens must be at least 1")
    _check_output_file(json_out, "--json")  # before benchmarking, not after it
    _check_output_file(plot, "--plot")
    if plot:
        from leapc.plots import pyplot

        pyplot()
    loaded = leapc.load(engine, device)  # each policy's programs load at its warm-up run
    if loaded.manifest.model.diffusion is not None:
        result = _bench_diffusion(loaded, policies, load_prompts(prompts), max_new_tokens,
                                  repeats, vs_hf or vs_llamacpp or plot is not None)
    else:
        cfg = BenchConfig(_policies(policies), load_prompts(prompts), max_new_tokens, repeats,
                          draft)
        with out.status("benchmarking"):
            result = run_bench(loaded, cfg, vs_hf, vs_llamacpp=vs_llamacpp)
        out.print(bench_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    if plot:
        from leapc.plots import plot_speedups

        plot_speedups(result, plot)


def _bench_diffusion(engine, policies: str, prompts: tuple[str, ...], max_new_tokens: int,
                     repeats: int, baselines: bool) -> dict:
    """`leapc bench` on a block-diffusion engine: its policies (all of them unless named)
    against mdm, at their default knobs."""
    from leapc.benchmark import DiffusionRun, diffusion_table, run_diffusion_bench

    if baselines:
        raise InputError("--vs-hf, --vs-llamacpp and --plot are for autoregressive engines "
                         "(this is a block-diffusion engine)")
    # the default (`ar,auto`) means every policy the engine offers
    offered = [p.value for p in engine.manifest.policies]
    named = offered if policies == f"ar,{AUTO_POLICY}" else list(_policies(policies))
    for name in named:
        engine.policy(name)  # one line if the engine does not offer it
    runs = tuple(DiffusionRun(n, engine.policy(n).value) for n in named)
    with out.status("benchmarking"):
        result = run_diffusion_bench(engine, runs, prompts, max_new_tokens, repeats)
    out.print(diffusion_table(result))
    return result


def _check_output_file(path: Path | None, option: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; give a file to write")
    if not path.parent.is_dir():
        raise InputError(f"{option} {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: directory {path.parent} is not writable")


@app.command()
def demo() -> None:
    """Build the bundled model (once), complete code prompts, show the bench table."""
    from leapc.demo import run_demo

    run_demo(out)


def _fail(message: object) -> None:
    err.print(f"error: {message}", markup=False, highlight=False)
    sys.exit(2)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: a build's staging directory is removed


def main(argv: list[str] | None = None) -> None:
    # torch warns about its own pytree internals whenever a program is copied
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # typer turns KeyboardInterrupt inside a command into a returned 130
        code = app(args=argv, standalone_mode=False)
    except KeyboardInterrupt:
        code = 130
    except LeapcUserError as e:
        _fail(e)
    except ModuleNotFoundError as e:  # a compile-side command on a runtime-only install
        missing = MissingDependencyError.from_import(e)
        if missing is None:
            raise
        _fail(missing)
    except ImportError as e:
        # Ctrl-C while a C extension (onnxruntime) initialises surfaces as an ImportError
        if not isinstance(e.__cause__, KeyboardInterrupt):
            raise
        code = 130
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # bad flag, missing argument, bad value
        _fail(e.format_message())
    if code == 130:
        err.print("interrupted", markup=False, highlight=False)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
