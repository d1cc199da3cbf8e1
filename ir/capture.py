"""Capture a Hugging Face decoder-only model as the step program (DESIGN §2).

The model runs its own transformers code: a thin wrapper fills a `DynamicCache` from the
``past`` input, hands the model an additive 4-D mask built from the boolean ``mask`` input
(transformers uses a 4-D mask as given; sliding-window layers get it narrowed to their
window), and returns the logits plus the keys/values the new tokens appended to the cache.
`torch.export` then traces that wrapper with symbolic B, N, T.

Any causal LM is captured by what it does, not by its family's name: what the step
contract cannot carry is refused by feature (`check_supported`, the cache layers its own
forward makes), and the captured program is compared with the model's own forward before
it is handed out (`check_capture`), so a model that captures but computes something else
is refused instead of becoming a wrong engine.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
from torch.export import Dim, ExportedProgram
from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from leapc.ir import signature as sig
from leapc.ir.capped_attention import capped_attention
from leapc.ir.dims import ModelDims
from leapc.ir.errors import UnsupportedModelError

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


FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer type names


@dataclass(frozen=True)
class MaskLayout:
    """The mask each decoder layer's attention gets, in transformers' layer-type terms.

    ``window``: how many positions a sliding-window layer sees, its own included (None: no
    such layer, or a window no call can exceed). ``per_type``: the model reads a dict of
    masks keyed by layer type (its layers mix full and windowed attention); otherwise every
    layer reads one mask.
    """

    window: int | None = None
    per_type: bool = False

    @classmethod
    def of(cls, model: PreTrainedModel, options: CaptureOptions) -> MaskLayout:
        """The layout of ``model``'s layers (transformers' own reading of its config, the one
        its `DynamicCache` uses); other layer types are refused by name."""
        cfg = model.config.get_text_config(decoder=True)
        types, kwargs = get_layer_types_and_kwargs(cfg)
        other = sorted(set(types) - {FULL, SLIDING})
        if other:
            raise UnsupportedModelError(f"{cfg.model_type}: {', '.join(other)} layers are not "
                                        "supported (only full and sliding-window attention)")
        windows = {kw["sliding_window"] for t, kw in zip(types, kwargs, strict=True) if t == SLIDING}
        if len(windows) > 1:
            raise UnsupportedModelError(f"{cfg.model_type}: sliding windows of different sizes "
                                        f"({sorted(windows)}) are not supported")
        # A window no shorter than max-seq never hides a key: those layers are full.
        window = next((w for w in windows if w < options.max_seq), None)
        return cls(window, per_type=window is not None and FULL in types)


def _within_window(positions: torch.Tensor, past_slots: int, window: int) -> torch.Tensor:
    """``[B, N, T + N]``: key within ``window`` positions of the query (its own included).

    Past slot ``j`` holds position ``j`` (the runtime's caches keep each row's tokens in
    order from slot 0); the new tokens' keys are at their own ``positions``.
    """
    past = torch.arange(past_slots, device=positions.device).expand(positions.shape[0], -1)
    keys = torch.cat([past, positions], dim=1)
    return (positions[:, :, None] - keys[:, None, :]) < window


class StepModule(torch.nn.Module):
    """``(tokens, positions, past, mask) -> (logits, present)`` over the model's own code."""

    def __init__(self, model: PreTrainedModel, layout: MaskLayout = MaskLayout()):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, tokens, positions, past, mask):
        cache = DynamicCache()
        cache.layers.extend(_PastLayer(past[i, 0], past[i, 1]) for i in range(past.shape[0]))
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=self._attention_mask(positions, past, mask),
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

    def _attention_mask(self, positions, past, mask):
        """The additive 4-D mask(s) the model's attention takes as given."""
        dtype = past.dtype

        def additive(allowed):
            return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]

        if self.layout.window is None:
            return additive(mask)
        windowed = additive(mask & _within_window(positions, past.shape[4], self.layout.window))
        return {FULL: additive(mask), SLIDING: windowed} if self.layout.per_type else windowed


def check_supported(model: PreTrainedModel) -> None:
    """Refuse, by feature, what the config says the step program would get wrong."""
    cfg = model.config.get_text_config()
    reasons = []
    if _uses_alibi(model):
        # Its bias is built from a 2-D padding mask; the step's 4-D mask cannot carry it.
        reasons.append("ALiBi position biases are not supported")
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_sets = [r for r in rope.values() if isinstance(r, dict)] or [rope]  # per layer type
    if any(r.get("rope_type") == "dynamic" for r in rope_sets):
        # Its frequencies are recomputed on a data-dependent branch (max position so far).
        reasons.append("dynamic RoPE scaling is not supported")
    if reasons:
        raise UnsupportedModelError(f"{cfg.model_type}: " + "; ".join(reasons))


def _uses_alibi(model: PreTrainedModel) -> bool:
    """The config asks for ALiBi, or a module's class builds ALiBi biases."""
    cfg = model.config.get_text_config()
    flags = (getattr(cfg, "alibi", False), getattr(getattr(cfg, "attn_config", None), "alibi", False))
    return any(flags) or any("alibi" in attr for module in model.modules()
                             for attr in vars(type(module)))


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


# The capture check's sample: a prompt past every window it can reach (windows up to
# CHECK_MAX_TOKENS - 4 are crossed), fed to the program in chunks as the runtime does.
CHECK_TOKENS, CHECK_MAX_TOKENS, CHECK_CHUNK = 24, 256, 8
# How far the program's logits may sit from the model's, relative to their magnitude.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
CHECK_TOLERANCE_REDUCED = 3e-2  # float16, bfloat16


@dataclass(frozen=True)
class _Reference:
    """The model's own forward on the check's sample (its own attention implementation and
    masks, transformers' `DynamicCache` made from its config)."""

    tokens: torch.Tensor  # [1, S]
    logits: torch.Tensor  # [1, S, V]
    cache: DynamicCache


def _reference(model: PreTrainedModel, layout: MaskLayout, options: CaptureOptions) -> _Reference:
    name = model.config.get_text_config().model_type
    length = min(max(CHECK_TOKENS, (layout.window or 0) + 4), CHECK_MAX_TOKENS,
                 options.max_seq - 1)
    vocab = model.config.get_text_config().vocab_size
    tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens, past_key_values=cache, use_cache=True).logits
    except Exception as err:  # noqa: BLE001 - the model's own code, refusing the cache or call
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UnsupportedModelError(f"{name}: its forward does not run with a DynamicCache "
                                    f"({type(err).__name__}: {reason})") from err
    return _Reference(tokens, logits, cache)


def _dims(model: PreTrainedModel, cache: DynamicCache) -> ModelDims:
    """The KV shapes the model's own forward wrote (not what its config names them)."""
    name = model.config.get_text_config().model_type
    kinds = sorted({type(lyr).__name__ for lyr in cache.layers
                    if type(lyr) not in (DynamicLayer, DynamicSlidingWindowLayer)})
    if kinds:
        raise UnsupportedModelError(f"{name}: cache layers of type {', '.join(kinds)} (state "
                                    "other than keys and values) are not supported")
    if any(lyr.keys.shape[-1] != lyr.values.shape[-1] for lyr in cache.layers):
        raise UnsupportedModelError(f"{name}: keys and values of different head sizes "
                                    "(e.g. multi-head latent attention) are not supported")
    shapes = {(lyr.keys.shape[1], lyr.keys.shape[3]) for lyr in cache.layers}
    if len(shapes) != 1:
        raise UnsupportedModelError(f"{name}: layers with different KV head counts or sizes "
                                    f"({sorted(shapes)}) are not supported")
    (kv_heads, head_dim), = shapes
    return replace(ModelDims.of(model), num_layers=len(cache.layers), num_kv_heads=kv_heads,
                   head_dim=head_dim)


def check_capture(program: ExportedProgram, reference: _Reference, dims: ModelDims,
                  options: CaptureOptions, name: str) -> None:
    """Refuse a program whose logits are not the model's own on the reference sample.

    The program runs the sample as the runtime would (chunks, the cache committed from
    slot 0, a dummy invalid slot before the first chunk), so whatever the step contract
    does not carry (a bias the 4-D mask replaced, a cache the model manages itself, an
    attention kwarg SDPA ignores) shows as a difference here instead of in an engine.
    """
    step = program.module()
    dtype = getattr(torch, dims.dtype)
    past = torch.zeros(dims.num_layers, 2, 1, dims.num_kv_heads, 1, dims.head_dim, dtype=dtype)
    chunk = min(CHECK_CHUNK, options.max_new)
    pieces = []
    with torch.no_grad():
        for start in range(0, reference.tokens.shape[1], chunk):
            tokens = reference.tokens[:, start:start + chunk]
            new = tokens.shape[1]
            slots = past.shape[4]
            mask = torch.cat([(torch.arange(slots) < start).expand(new, slots),
                              torch.ones(new, new, dtype=torch.bool).tril()], dim=1)
            logits, present = step(tokens, torch.arange(start, start + new)[None], past, mask[None])
            past = present if start == 0 else torch.cat([past, present], dim=4)
            pieces.append(logits)
    got, want = torch.cat(pieces, dim=1), reference.logits
    tolerance = CHECK_TOLERANCE.get(want.dtype, CHECK_TOLERANCE_REDUCED)
    error = (got.double() - want.double()).abs().max().item()
    if not error <= tolerance * (1 + want.abs().max().item()):  # NaN fails too
        raise UnsupportedModelError(
            f"{name}: the captured step program does not compute the model's own logits (max "
            f"difference {error:.3g} over {want.shape[1]} tokens): its forward depends on "
            "something the step contract does not carry")


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
               **kwargs):
    """leapc's attention function (transformers' interface): its SDPA function, or
    `leapc.capped_attention` where the layer soft-caps its logits (SDPA has no cap)."""
    if not softcap:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if dropout or attention_mask is None:
        raise UnsupportedModelError("soft-capped attention with dropout or without the step "
                                    "mask is not supported")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = capped_attention(query, key, value, attention_mask, scale, float(softcap))
    return out.transpose(1, 2).contiguous(), None


LEAPC_ATTENTION = "leapc_sdpa"  # the config's attention implementation: `_attention`
AttentionInterface.register(LEAPC_ATTENTION, _attention)


def _use_exportable_kernels(model: PreTrainedModel) -> None:
    """SDPA attention, and mixture-of-experts layers as gathers and batched matmuls (the
    default grouped matmul is a transformers custom op ONNX cannot translate)."""
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError):
        # Some classes opt out of SDPA for a feature only some configs use (soft-capping):
        # leapc's attention function is SDPA where a layer does not soft-cap and
        # `leapc.capped_attention` where it does; `check_capture` compares the result.
        model.config._attn_implementation = LEAPC_ATTENTION
    model.set_experts_implementation("batched_mm")  # a no-op without experts


def capture(model: PreTrainedModel, options: CaptureOptions = CaptureOptions()) -> CapturedProgram:
    """Export ``model`` as the step program with symbolic B, N, T, checked against its forward."""
    check_supported(model)
    model.eval()
    name = model.config.get_text_config().model_type
    layout = MaskLayout.of(model, options)
    reference = _reference(model, layout, options)
    dims = _dims(model, reference.cache)
    previous = model.config._attn_implementation, model.config._experts_implementation
    try:
        _use_exportable_kernels(model)
        program = export_step(StepModule(model, layout), dims, options)
    except UnsupportedModelError:
        raise
    except Exception as err:  # noqa: BLE001 - the model's own code, traced under the contract
        # It branches on values, pins a dim the contract keeps symbolic, or cannot take a
        # 4-D mask (it builds something else, an ALiBi bias, from a 2-D one).
        reason = str(err).strip().splitlines()[0]
        raise UnsupportedModelError(
            f"{name}: torch.export cannot capture it as a step program "
            f"({type(err).__name__}: {reason})"
        ) from err
    finally:
        model.config._attn_implementation, model.config._experts_implementation = previous
    check_capture(program, reference, dims, options, name)
    return CapturedProgram(program, step_signature(dims, options), dims)
