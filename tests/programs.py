"""Running and describing programs in the pass tests, and the model the early-exit passes
cut: a 4-layer tiny Llama with its exit at layer 2 (layers on both sides of the cut).

`parts` is the structure the Before/Expected tests compare: which of the model's modules
a program still computes tensors in (a pass that drops a sublayer drops its module).
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter

import torch
import transformers
from families import captured, tiny_config

from leapc.ir.anatomy import module_path
from leapc.ir.capture import CapturedProgram, CaptureOptions, capture

DEEP_LAYERS, EXIT = 4, 2
ATTENTION = ("input_layernorm", "self_attn")  # a Llama layer's attention branch
MLP = ("post_attention_layernorm", "mlp")


def run(program: CapturedProgram, *inputs):
    with torch.no_grad():
        return program.program.module()(*inputs)


def call_counts(program: CapturedProgram) -> Counter:
    return Counter(n.target for n in program.program.graph.nodes if n.op == "call_function")


def parts(program: CapturedProgram) -> set[str]:
    """Modules (down to a layer's sublayers) in which the program computes a tensor."""
    found = set()
    for node in program.program.graph.nodes:
        path = module_path(node)
        if node.op == "call_function" and path and isinstance(node.meta.get("val"), torch.Tensor):
            found.add(".".join(path.split(".")[:4]) if path.startswith("model.layers.") else path)
    return found


def llama_layer(index: int, *branches: tuple[str, ...]) -> set[str]:
    """A Llama layer's parts with the given branches (its residual adds included)."""
    return {f"model.layers.{index}", *(f"model.layers.{index}.{p}" for b in branches for p in b)}


def llama_parts(layers: dict[int, tuple[tuple[str, ...], ...]], embedding: bool = True) -> set[str]:
    """A Llama program's parts: ``layers`` maps each layer kept to its branches kept."""
    kept = {p for i, branches in layers.items() for p in llama_layer(i, *branches)}
    return kept | {"model.rotary_emb", "model.norm", "lm_head"} | (
        {"model.embed_tokens"} if embedding else set())


@functools.cache
def deep_model() -> transformers.PreTrainedModel:
    config = tiny_config("llama")
    config.num_hidden_layers = DEEP_LAYERS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@functools.cache
def exit_source(key: str) -> tuple[CapturedProgram, int]:
    """``"deep"`` (4 layers, exit 2) or a family's 2-layer program (exit 1)."""
    if key == "deep":
        options = CaptureOptions(max_seq=64, max_batch=4, max_new=16)
        return capture(deep_model(), options), EXIT
    return captured(key), 1


def hf_exit_reference(model, prefix: torch.Tensor, new: torch.Tensor, exit_layer: int):
    """HF's past over ``prefix``; at the ``new`` tokens, the logits of HF's residual stream
    after ``exit_layer`` layers through the model's final norm and head, the hidden state
    itself, and the model's logits."""
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        past = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
        out = model(input_ids=torch.cat([prefix, new], dim=1), output_hidden_states=True)
        hidden = out.hidden_states[exit_layer][:, prefix.shape[1]:]
        with _bypassed_from(model, exit_layer):  # whatever follows the layers, logit scales too
            exit_logits = model(input_ids=torch.cat([prefix, new], dim=1)).logits
        return past, exit_logits[:, prefix.shape[1]:], hidden, out.logits[:, prefix.shape[1]:]


@contextlib.contextmanager
def _bypassed_from(model, first: int):
    """``model`` with decoder layers ``first`` on passing their input hidden state through."""
    def identity(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    decoder = model.get_decoder()
    layers = decoder.layers if hasattr(decoder, "layers") else decoder.h
    handles = [layer.register_forward_hook(identity, with_kwargs=True) for layer in layers[first:]]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def decode_inputs(vocab: int, prefix: int = 6, new: int = 4, batch: int = 2):
    """Random ``prefix`` and ``new`` tokens, and the step inputs (positions, causal mask)
    of the ``new`` ones after the prefix."""
    g = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(3, vocab, (batch, prefix), generator=g)
    new_ids = torch.randint(3, vocab, (batch, new), generator=g)
    positions = torch.arange(prefix, prefix + new).expand(batch, new).contiguous()
    mask = torch.cat([torch.ones(new, prefix, dtype=torch.bool),
                      torch.ones(new, new, dtype=torch.bool).tril()], dim=1)
    return prefix_ids, new_ids, positions, mask.expand(batch, new, prefix + new).contiguous()
