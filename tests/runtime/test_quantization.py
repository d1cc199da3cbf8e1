"""`leapc build --quantize int8|bf16|int4`: MatMul weights stored as int8 (leapc's
Q8MatMul), bfloat16 (leapc's BF16MatMul) or int4 (ORT's MatMulNBits), attention
width-invariant (leapc's kernel; the ONNX lowering for int4), so every policy reproduces
the engine's own `ar`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from engines import TRAINING_FREE, tiny_source

import leapc
from leapc.ir.errors import InputError
from leapc.kernels.ort_ops import WeightFormat
from leapc.runtime.decode import prefill, tree_inputs
from leapc.runtime.drafters.base import Draft
from leapc.runtime.manifest import Attention, Quantization
from leapc.runtime.policies import Policy

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]


# the engines that run leapc's GEMM kernels, and their weight format
LEAPC_KERNELS = {Quantization.INT8: WeightFormat.Q8, Quantization.BF16: WeightFormat.BF16}


@pytest.fixture(scope="module", params=["int8", "bf16", "int4"])
def quantized_engine(tmp_path_factory, request):
    """The tiny Llama, int8 (bf16: leapc's kernels on bfloat16 weights; int4: ORT's on 4-bit
    ones), with an early
    exit (its draft and remainder are quantized too), as long as width-invariant attention
    allows: steps reach past several blocks of keys of one ``Dv + 1``-column GEMM (256),
    where the cache's free slots sit between the past and a step's new keys."""
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return leapc.load(leapc.build(tiny_source("llama"), out, "ort", max_seq=1024,
                                  quantize=request.param, exit_layer=1))


@pytest.mark.slow  # the int8 engine: a build of its own
def test_every_constant_matmul_becomes_an_integer_matmul(quantized_engine):
    graph = onnx.load(str(quantized_engine.path / "full.onnx")).graph
    weights = {init.name for init in graph.initializer}
    ops = [node.op_type for node in graph.node]
    leapc_format = LEAPC_KERNELS.get(quantized_engine.manifest.quantization)
    # int8, bf16: leapc's kernels (their library ships beside the program); int4: ORT's
    kernels = set(leapc_format.ops) if leapc_format else {"MatMulNBits"}
    # each layer's qkv, o, gate_up and down (q/k/v and gate/up are fused), and the head
    assert sum(op in kernels for op in ops) == 4 * 2 + 1
    float_weight_matmuls = [n for n in graph.node
                            if n.op_type == "MatMul" and n.input[1] in weights]
    assert not float_weight_matmuls
    for name in ("draft", "remainder"):  # they share the step's KV rows and hidden states
        assert kernels & {n.op_type for n in
                          onnx.load(str(quantized_engine.path / f"{name}.onnx")).graph.node}


@pytest.mark.slow
def test_the_early_exit_computes_on_the_steps_copy_of_its_weights(quantized_engine):
    """leapc's kernels take the engine's one buffer (`ort_shared_weights`): the exit draft's
    layers are the step's, in the same memory, so a draft call leaves them warm in the
    cache for the verify step. ORT's own kernels (int4) repack their weights per session."""
    step, draft = quantized_engine.step, quantized_engine.program("draft")
    if quantized_engine.manifest.quantization not in LEAPC_KERNELS:
        assert step.weights is draft.weights is None
        return
    assert step.weights is draft.weights is not None
    index = step.weights.index.programs
    common = set(index["draft.onnx"].values()) & set(index["full.onnx"].values())
    assert sum(s.nbytes for s in common) > 0.9 * sum(s.nbytes for s in index["draft.onnx"].values())


@pytest.mark.slow
def test_a_layer_on_leapc_kernels_is_five_nodes(quantized_engine):
    """Norm + q/k/v projection, the attention block, the output projection + residual,
    norm + gate/up, SwiGLU + down projection + residual (`fold_into_leapc_matmuls`,
    `fuse_rotary_attention`); the final norm goes into the head's projection."""
    weights = LEAPC_KERNELS.get(quantized_engine.manifest.quantization)
    if weights is None:
        pytest.skip("int4 runs ORT's kernels: nothing to fold into")
    ops = Counter(n.op_type for n in
                  onnx.load(str(quantized_engine.path / "full.onnx")).graph.node)
    layers = 2
    plain, norm, swiglu = weights.ops
    assert {op: ops[op] for op in (*weights.ops, "RotaryTreeAttention")} == {
        norm: 2 * layers + 1, plain: layers, swiglu: layers, "RotaryTreeAttention": layers}
    assert not {"Add", "RMSNormalization", "Sigmoid", "Split", "Transpose"} & set(ops)


@pytest.mark.slow
def test_integer_engines_lower_attention_width_invariant_by_default(quantized_engine):
    """int8 and bf16 engines carry leapc's library, so attention is its kernel, reading the
    cache in place, each layer's block from the q/k/v projection on one node
    (`fuse_rotary_attention`); int4 ones (ORT's kernels) get the width-invariant ONNX
    lowering."""
    graph = onnx.load(str(quantized_engine.path / "full.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert "Attention" not in ops  # ORT's fused node: its rows move with the step's width
    if quantized_engine.manifest.quantization in LEAPC_KERNELS:
        assert quantized_engine.manifest.attention is Attention.KERNEL
        assert ops.count("RotaryTreeAttention") == 2  # one per layer
        assert not {"TreeAttention", "RotaryEmbedding", "Transpose"} & set(ops)
        cache_copies = [n for n in graph.node if n.op_type == "Concat"
                        and any(name.startswith("past.") for name in n.input)]
        assert not cache_copies
    else:
        assert quantized_engine.manifest.attention is Attention.INVARIANT
        assert not {"TreeAttention", "RotaryTreeAttention"} & set(ops)


@pytest.mark.slow
def test_reduced_precision_logits_stay_close_to_float32(quantized_engine, engine_dir):
    full = leapc.load(engine_dir("tiny-llama", "ort"))
    ours, reference = (e.generate(PROMPT, 1) for e in (quantized_engine, full))
    int8 = quantized_engine.manifest.quantization in LEAPC_KERNELS  # int8 or finer
    if int8:
        assert ours.token_ids == reference.token_ids
    inputs = tree_inputs(full.new_cache(), Draft.chain_of(PROMPT[0], PROMPT[1:]))
    exact = full.step(*inputs)["logits"]
    rounded = quantized_engine.step(*inputs)["logits"]
    assert np.abs(rounded - exact).max() < (0.05 if int8 else 0.5) * np.abs(exact).max()
    assert np.abs(rounded - exact).max() > 0  # the weights really changed


def _one_token_steps(engine, context: list[int], tokens: list[int]) -> np.ndarray:
    """The logits rows of ``tokens`` as `ar` computes them: one step each, committing
    each token before the next."""
    cache = engine.new_cache()
    prefill(engine.step, cache, context, engine.manifest.max_new)
    rows = []
    for token in tokens:
        out = engine.step(*tree_inputs(cache, Draft.root_only(token)))
        cache.commit(out["present"], [0])
        rows.append(out["logits"][0, 0])
    return np.stack(rows)


def _one_wide_step(engine, context: list[int], tokens: list[int]) -> np.ndarray:
    cache = engine.new_cache()
    prefill(engine.step, cache, context, engine.manifest.max_new)
    return engine.step(*tree_inputs(cache, Draft.chain_of(tokens[0], tokens[1:])))["logits"][0]


@pytest.mark.slow
@pytest.mark.parametrize("past", (1, 37, 250, 500, 1000))
def test_a_tokens_logits_are_bit_identical_in_steps_of_any_width(quantized_engine, past):
    """What verification relies on: a chain verified in one step of width k gives each
    token the logits `ar` gives it (bit for bit, not close), at short and long pasts; at
    250 and 500 the chain's keys sit after free slots, across a 256-key boundary from
    where `ar` puts them."""
    rng = np.random.default_rng(past)
    context = rng.integers(3, 250, past).tolist()
    tokens = rng.integers(3, 250, 16).tolist()
    expected = _one_token_steps(quantized_engine, context, tokens)
    for width in (2, 5, 16 if past < 1000 else 8):
        wide = _one_wide_step(quantized_engine, context, tokens[:width])
        np.testing.assert_array_equal(wide, expected[:width], err_msg=f"width {width}")


@pytest.mark.slow
def test_kernel_attention_is_width_invariant_past_1024_keys(tmp_path):
    """leapc's attention kernel has no length limit (the ONNX lowering holds to 1024 keys):
    an int8 engine of 2048 positions verifies bit for bit at a past of 1500, and drafts."""
    source = tiny_source("llama")
    source.model.config.max_position_embeddings = 2048  # plain RoPE: any length is the model's
    engine = leapc.load(leapc.build(source, tmp_path, "ort", max_seq=2048, quantize="int8"))
    assert Policy.LOOKUP in engine.manifest.policies
    rng = np.random.default_rng(1500)
    context, tokens = rng.integers(3, 250, 1500).tolist(), rng.integers(3, 250, 8).tolist()
    expected = _one_token_steps(engine, context, tokens)
    for width in (3, 8):
        np.testing.assert_array_equal(_one_wide_step(engine, context, tokens[:width]),
                                      expected[:width], err_msg=f"width {width}")


@pytest.mark.slow
def test_fused_attention_is_not_width_invariant_on_int8(tmp_path):
    """Why int8 engines default to ``--attention invariant``: with ORT's fused node, the
    same comparison fails, and the engine offers `ar` only."""
    fused = leapc.load(leapc.build(tiny_source("llama"), tmp_path, "ort", max_seq=256,
                                   quantize="int8", attention="tree"))
    assert fused.manifest.policies == (Policy.AR,)
    rng = np.random.default_rng(37)
    context, tokens = rng.integers(3, 250, 37).tolist(), rng.integers(3, 250, 16).tolist()
    expected = _one_token_steps(fused, context, tokens)
    assert not np.array_equal(_one_wide_step(fused, context, tokens), expected)


@pytest.mark.slow
def test_policies_are_token_identical_to_ar_on_reduced_precision(quantized_engine):
    offered = {p.value for p in quantized_engine.manifest.policies}
    assert offered == set(TRAINING_FREE) | {Policy.EARLY_EXIT.value}
    # no unrolled exit chain on these lowerings: slower or inexact (`early_exit._builds_chain`)
    assert "draft_chain" not in quantized_engine.manifest.programs
    rng = np.random.default_rng(0)
    repetitive = (PROMPT * 30)[:240]  # drafts accepted often, steps crossing 256 keys
    for prompt in (PROMPT, rng.integers(3, 250, 60).tolist(), repetitive):
        ar = quantized_engine.generate(prompt, 48).token_ids
        for policy in offered - {"ar"}:
            assert quantized_engine.generate(prompt, 48, policy=policy).token_ids == ar, policy


@pytest.mark.slow
@pytest.mark.parametrize("policy", ("lookup", "recycle", "lookahead", "draft", "retrieval"))
def test_int8_policy_is_token_identical_to_ar_on_the_bundled_model(engine_dir, policy):
    """On held-out code, past 256 keys: where recycle and lookahead left `ar`'s tokens
    while the attention GEMM summed keys in blocks of 256 (docs/decisions.md)."""
    from leapc.models import corpus

    engine = leapc.load(engine_dir("bundled", quantize="int8"))
    if policy not in [p.value for p in engine.manifest.policies]:
        pytest.skip(f"the bundled engine has no {policy!r} policy (bundled draft model absent)")
    for prompt in corpus.held_out_prompts(6):
        assert engine.generate(prompt, 128, policy=policy).token_ids == \
            engine.generate(prompt, 128).token_ids, prompt


def test_quantizing_needs_the_ort_backend(tmp_path):
    with pytest.raises(InputError, match="--quantize int8 needs the ort backend"):
        leapc.build(tiny_source("llama"), tmp_path, "eager", quantize="int8")
    with pytest.raises(InputError, match="unknown quantization 'int3'"):
        leapc.build(tiny_source("llama"), tmp_path, "ort", quantize="int3")


def test_width_invariant_attention_needs_the_ort_backend(tmp_path):
    with pytest.raises(InputError, match=r"^--attention invariant needs the ort backend "
                                         r"\(got eager\)$"):
        leapc.build(tiny_source("llama"), tmp_path, "eager", attention="invariant")


def test_int8_kernels_are_a_build_choice():
    """``int8`` is leapc's Q8MatMul, ``int8-nbits`` ORT's MatMulNBits: the same scheme,
    each program compressed the way its engine names, and both width-invariant (leapc's
    attention kernel, or ORT's operators only)."""
    from leapc.runtime.backends.base import Compression
    from leapc.stage import BuildOptions

    for name, kernel, attention in (("int8", Compression.INT8, Attention.KERNEL),
                                    ("int8-nbits", Compression.INT8_NBITS, Attention.INVARIANT)):
        options = BuildOptions.parse("ort", quantize=name)
        assert options.quantize is Quantization(name)
        assert options.attention is attention
        assert options.lowering.compression(Compression.NONE) is kernel
        assert options.lowering.compression(Compression.DRAFT) is kernel
