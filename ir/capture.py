"""Capture a Hugging Face decoder-only model as the step program (DESIGN §2).

The model runs its own transformers code: a thin wrapper fills a `DynamicCache` from the
``past`` input, hands the model an additive 4-D mask built from the boolean ``mask`` input
(transformers uses a 4-D mask as given), and returns the logits plus the keys/values the
new tokens appended to the cache. `torch.export` then traces that wrapper with symbolic
B, N, T.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch._dynamo.exc import UserError
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from leapc.ir import signature as sig
from leapc.ir.dims import ModelDims
from leapc.ir.errors import UnsupportedModelError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
STEP_INPUTS = ("tokens", "positions", "past", "mask")
STEP_OUTPUTS = ("logits", "present")
# A remainder program (passes/slice_remainder.py) takes the residual stream instead of tokens.
HIDDEN_INPUT = "hidden"
# Kangaroo's adapter KV (`ir/adapter.py`): one layer shaped like the step's past / present.
ADAPTER_PAST, ADAPTER_PRESENT = "adapter_past", "adapter_present"


@dataclass(frozen=True)
class CaptureOptions:
    max_seq: int = 1024  # bound on T + N
    max_batch: int = 8  # bound on B
    max_new: int = 128  # bound on N: the prefill chunk and the largest verified tree


@dataclass(frozen=True)
class CapturedProgram:
    program: ExportedProgram
    signature: sig.StepSignature
    dims: ModelDims


class _PastLayer(DynamicLayer):
    """A cache layer that starts out holding ``past`` and keeps every new row.

    Filling a stock `DynamicLayer` through ``update`` would concatenate ``past`` onto a
    lifted empty constant (an in-place ``detach_`` in the graph), and a config-built cache
    would use `DynamicSlidingWindowLayer`, which trims what it stores.

    ``present`` is the rows ``update`` received, not a slice of the concatenation: sliced,
    every layer's rows cost a ``Slice`` node the ONNX graph runs each step.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.new_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.new_rows is not None:
            raise UnsupportedModelError("the model updated a cache layer twice in one step")
        self.new_rows = key_states, value_states
        return super().update(key_states, value_states, *args, **kwargs)


class StepModule(torch.nn.Module):
    """``(tokens, positions, past, mask) -> (logits, present)`` over the model's own code."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, past, mask):
        cache = DynamicCache()
        cache.layers.extend(_PastLayer(past[i, 0], past[i, 1]) for i in range(past.shape[0]))
        dtype = past.dtype
        # transformers hands a 4-D mask to attention as given (additive for every backend).
        additive = torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=additive,
            past_key_values=cache,
            use_cache=True,
        )
        if len(cache.layers) != past.shape[0]:
            raise UnsupportedModelError(
                f"the model wrote {len(cache.layers)} cache layers for {past.shape[0]} past layers"
            )
        if any(lyr.new_rows is None for lyr in cache.layers):
            raise UnsupportedModelError("the model left a cache layer without new rows")
        present = torch.stack([torch.stack(lyr.new_rows) for lyr in cache.layers])
        return out.logits, present


def check_supported(model: PreTrainedModel, options: CaptureOptions) -> None:
    """Refuse models the step program would get wrong, naming every reason at once."""
    cfg = model.config.get_text_config()
    family = cfg.model_type
    reasons = []
    if getattr(cfg, "attn_logit_softcapping", None):
        reasons.append("attention logit soft-capping is not supported")
    layer_types = getattr(cfg, "layer_types", None) or ()
    window = getattr(cfg, "sliding_window", None)
    uses_window = any(t != "full_attention" for t in layer_types) or (
        not layer_types and window is not None and getattr(cfg, "use_sliding_window", True)
    )
    # The dense mask input carries no window: the model would attend past it silently.
    if uses_window and (window is None or window < options.max_seq):
        reasons.append(f"sliding-window attention (window {window}) shorter than max-seq "
                       f"{options.max_seq} is not supported")
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_sets = [r for r in rope.values() if isinstance(r, dict)] or [rope]  # per layer type
    if any(r.get("rope_type") == "dynamic" for r in rope_sets):
        # Its frequencies are recomputed on a data-dependent branch (max position so far).
        reasons.append("dynamic RoPE scaling is not supported")
    if family not in SUPPORTED_FAMILIES:
        reasons.append(f"model family {family!r} is not supported "
                       f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
    if reasons:
        raise UnsupportedModelError(f"{family}: " + "; ".join(reasons))


def step_signature(dims: ModelDims, options: CaptureOptions) -> sig.StepSignature:
    b, n, t = sig.B, sig.N, sig.T
    kv = (dims.num_layers, 2, b, dims.num_kv_heads)
    return sig.StepSignature(
        inputs=(
            sig.TensorSpec("tokens", "int64", (b, n)),
            sig.TensorSpec("positions", "int64", (b, n)),
            sig.TensorSpec("past", dims.dtype, (*kv, t, dims.head_dim)),
            sig.TensorSpec("mask", "bool", (b, n, t + n)),
        ),
        outputs=(
            sig.TensorSpec("logits", dims.dtype, (b, n, dims.vocab_size)),
            sig.TensorSpec("present", dims.dtype, (*kv, n, dims.head_dim)),
        ),
        bounds=step_bounds(options),
        max_seq=options.max_seq,
    )


def example_inputs(dims: ModelDims, batch: int = 2, new: int = 3, past: int = 5):
    """Random step inputs; distinct sizes so export does not specialise B, N, T together."""
    dtype = getattr(torch, dims.dtype)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dims.vocab_size, (batch, new), generator=g)
    positions = (past + torch.arange(new)).expand(batch, new).contiguous()
    kv = torch.randn(dims.num_layers, 2, batch, dims.num_kv_heads, past, dims.head_dim,
                     generator=g).to(dtype)
    causal = torch.ones(new, new, dtype=torch.bool).tril()
    mask = torch.cat([torch.ones(new, past, dtype=torch.bool), causal], dim=1)
    return tokens, positions, kv, mask.expand(batch, new, past + new).contiguous()


def dynamic_shapes(options: CaptureOptions) -> dict:
    b, n, t = (Dim(name, min=lo, max=hi) for name, (lo, hi) in
               step_bounds(options).items())
    return {
        "tokens": {0: b, 1: n},
        HIDDEN_INPUT: {0: b, 1: n},
        "positions": {0: b, 1: n},
        "past": {2: b, 4: t},
        ADAPTER_PAST: {2: b, 4: t},
        # T + N of two Dims is not expressible; AUTO lets export derive it.
        "mask": {0: b, 1: n, 2: Dim.AUTO},
    }


def step_bounds(options: CaptureOptions) -> dict[str, tuple[int, int]]:
    return {"B": (1, options.max_batch), "N": (1, options.max_new), "T": (1, options.max_seq - 1)}


def export_step(module: torch.nn.Module, dims: ModelDims, options: CaptureOptions) -> ExportedProgram:
    """``torch.export`` a step-contract module with symbolic B, N, T (capture and re-export).

    Export traces every dynamic dim with a lower bound of 2 (to avoid 0/1 specialisation)
    and relaxes only the declared `Dim`s back to 1 afterwards; the mask's derived ``T + N``
    keeps ``>= 4``, so the program would refuse ``T = N = 1`` (a one-token prompt behind
    the dummy slot). Its range is recomputed from the declared dims and capped at
    ``max_seq``, which also makes the program check ``T + N <= max_seq`` on every call.

    Inputs are those named by ``module.forward``'s parameters: the step inputs, or
    ``hidden [B, N, H]`` in place of ``tokens`` for a remainder program.
    """
    examples = dict(zip(STEP_INPUTS, example_inputs(dims), strict=True))
    batch, new = examples["tokens"].shape
    examples[HIDDEN_INPUT] = torch.randn(batch, new, dims.hidden_size).to(getattr(torch, dims.dtype))
    examples[ADAPTER_PAST] = examples["past"][:1]
    names = tuple(inspect.signature(module.forward).parameters)
    shapes = dynamic_shapes(options)
    with torch.no_grad():
        program = torch.export.export(
            module, tuple(examples[n] for n in names),
            dynamic_shapes={n: shapes[n] for n in names}, strict=False,
        )
    _fix_mask_range(program, options)
    return program


def _fix_mask_range(program: ExportedProgram, options: CaptureOptions) -> None:
    mask = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "mask")
    total = mask.meta["val"].shape[2]
    if not isinstance(total, torch.SymInt):
        return
    expr = total.node.expr
    ranges = program.range_constraints
    roots = {s: ranges[s] for s in expr.free_symbols if s in ranges}
    if expr in ranges and len(roots) == len(expr.free_symbols):
        derived = bound_sympy(expr, roots)
        ranges[expr] = ValueRanges(derived.lower, min(derived.upper, options.max_seq))


def capture(model: PreTrainedModel, options: CaptureOptions = CaptureOptions()) -> CapturedProgram:
    """Export ``model`` as the step program with symbolic B, N, T."""
    check_supported(model, options)
    model.eval()
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError) as err:
        raise UnsupportedModelError(f"{model.config.model_type}: no SDPA attention ({err})") from err
    dims = ModelDims.of(model)
    try:
        program = export_step(StepModule(model), dims, options)
    except (GuardOnDataDependentSymNode, UserError) as err:
        # The model's code branches on values or pins a dim the contract keeps symbolic.
        reason = str(err).strip().splitlines()[0]
        raise UnsupportedModelError(
            f"{model.config.model_type}: torch.export cannot capture it as a step program "
            f"({type(err).__name__}: {reason})"
        ) from err
    finally:
        if previous and previous != "sdpa":
            model.set_attn_implementation(previous)
    return CapturedProgram(program, step_signature(dims, options), dims)
