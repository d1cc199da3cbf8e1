"""leapc's ``TreeAttention`` kernel (kernels/native/tree_attention.c) run by ONNX Runtime:
close to the reference, a token's row bit-identical however the step around it is laid out,
never reading the cache's free slots, and the errors for inputs that do not fit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from leapc.kernels import reference
from leapc.kernels.ort_ops import DOMAIN, compile_library
from leapc.runtime.backends.ort import session_options

pytestmark = pytest.mark.skipif(
    "avx512_vnni" not in open("/proc/cpuinfo").read(),
    reason="leapc's ORT ops need a CPU with AVX512-VNNI")

INPUTS = (("q", TensorProto.FLOAT), ("k_past", TensorProto.FLOAT), ("k_new", TensorProto.FLOAT),
          ("v_past", TensorProto.FLOAT), ("v_new", TensorProto.FLOAT),
          ("past_len", TensorProto.INT64), ("tree_mask", TensorProto.BOOL))
SCALE = 0.25
SOFTCAP = 1.5  # scores of these random inputs reach well past it


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return compile_library(tmp_path_factory.mktemp("ops") / "ops.so")


def _one_node_session(library, op: str, inputs, outputs, **attributes):
    """An ORT session of one ``ai.leapc`` node on the compiled library; ``inputs`` are
    ``(name, element type)`` pairs, the outputs float."""
    node = helper.make_node(op, [name for name, _ in inputs], list(outputs), domain=DOMAIN,
                            **attributes)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(name, kind, None) for name, kind in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(DOMAIN, 1)])
    options = session_options()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def attention(library):
    """``run(q, k, v, past_len, tree_mask, T, softcap=0, window=0)``: the one-node model on
    the compiled library, ``k``/``v`` split into the cache's T slots and the new keys;
    without a cap or a window the node has no such attribute (how engines without one
    write it)."""
    sessions = {}

    def run(q, k, v, past_len, tree_mask, past, softcap=0.0, window=0):
        if (softcap, window) not in sessions:
            optional = {name: x for name, x in (("softcap", softcap), ("window", window)) if x}
            sessions[softcap, window] = _one_node_session(library, "TreeAttention", INPUTS,
                                                          ["out"], scale=SCALE, **optional)
        feeds = dict(q=q, k_past=k[:, :, :past], k_new=k[:, :, past:], v_past=v[:, :, :past],
                     v_new=v[:, :, past:], past_len=past_len, tree_mask=tree_mask)
        return sessions[softcap, window].run(
            None, {name: np.ascontiguousarray(x) for name, x in feeds.items()})[0]

    return run


def _random_tree(rng, batch: int, new: int) -> np.ndarray:
    """``[B, N, N]`` ancestor matrices of random trees (parent before child)."""
    mask = np.zeros((batch, new, new), dtype=bool)
    for b in range(batch):
        for n in range(new):
            mask[b, n] = mask[b, rng.integers(0, n)] if n else False
            mask[b, n, n] = True
    return mask


@pytest.mark.parametrize("batch, heads, kv_heads, new, past, dim, dim_v", [
    (1, 10, 2, 1, 256, 32, 32),  # the bundled model's decode step
    (1, 10, 2, 8, 300, 32, 32),
    (2, 8, 8, 5, 37, 8, 8),  # no GQA, a head dim under one vector (stories260K's)
    (1, 4, 2, 16, 100, 40, 24),  # head dims not multiples of 16, Dv != D
    (3, 6, 3, 3, 0, 64, 64),  # an empty cache: prefill's first chunk
    (2, 6, 2, 1, 50, 32, 32),  # three query heads a KV head: a group of three rows
])
@pytest.mark.parametrize("softcap", (0.0, SOFTCAP))
def test_equals_the_reference(attention, batch, heads, kv_heads, new, past, dim, dim_v, softcap):
    rng = np.random.default_rng(new * past + dim)
    q = rng.standard_normal((batch, heads, new, dim), dtype=np.float32)
    k = rng.standard_normal((batch, kv_heads, past + new, dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, past + new, dim_v), dtype=np.float32)
    past_len = rng.integers(0, past + 1, batch)
    tree_mask = _random_tree(rng, batch, new)
    expected = reference.tree_attention(*map(torch.from_numpy, (q, k, v, past_len, tree_mask)),
                                        SCALE, softcap).numpy()
    np.testing.assert_allclose(attention(q, k, v, past_len, tree_mask, past, softcap), expected,
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("window", (1, 3, 20, 70))
@pytest.mark.parametrize("chain", (False, True))
def test_equals_the_reference_in_a_sliding_window(attention, window, chain):
    """Windows shorter than the past (37), than the tree (a chain of 16 new tokens) and
    longer than both; batch rows of different past lengths; capped when the tree is."""
    rng = np.random.default_rng(window)
    batch, heads, kv_heads, new, past, dim = 3, 6, 2, 16, 37, 24
    q = rng.standard_normal((batch, heads, new, dim), dtype=np.float32)
    k = rng.standard_normal((batch, kv_heads, past + new, dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, past + new, dim), dtype=np.float32)
    past_len = np.array([past, 5, 0])
    tree_mask = (np.broadcast_to(np.tril(np.ones((new, new), bool)), (batch, new, new)).copy()
                 if chain else _random_tree(rng, batch, new))
    softcap = 0.0 if chain else SOFTCAP
    expected = reference.tree_attention(*map(torch.from_numpy, (q, k, v, past_len, tree_mask)),
                                        SCALE, softcap, window).numpy()
    got = attention(q, k, v, past_len, tree_mask, past, softcap, window)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6)
    if window < past:  # the window hides keys here: it must be read from the node
        assert np.abs(got - attention(q, k, v, past_len, tree_mask, past, softcap)).max() > 1e-3


def test_the_soft_cap_changes_the_result(attention):
    """The cap is read from the node: the inputs above are ones it changes."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 3, 32), dtype=np.float32) for _ in range(3))
    inputs = q, k, v, np.array([0]), np.tril(np.ones((1, 3, 3), bool)), 0
    assert np.abs(attention(*inputs, SOFTCAP) - attention(*inputs)).max() > 0.1


@pytest.mark.parametrize(("softcap", "window"), [(0.0, 0), (SOFTCAP, 0), (0.0, 2), (0.0, 40),
                                                 (SOFTCAP, 100)])
@pytest.mark.parametrize("context", (1, 17, 255, 1500))
def test_a_tokens_row_is_bit_identical_however_the_step_is_laid_out(attention, context, softcap,
                                                                     window):
    """The property exact speculation on int8 weights needs. Token x with its ``context``
    ancestors is computed (a) as `ar` does: ancestors in the cache, x the one new token;
    (b) as verification does: the last 3 ancestors new in the step, beside drafted
    siblings x does not see, and the cache longer than its valid prefix, its free slots
    NaN (read, they would poison the row). Its rows must be equal bit for bit, in a
    sliding window too (2: shorter than the drafted chain; 40 and 100: within the cache)."""
    rng = np.random.default_rng(context)
    heads, kv_heads, dim = 10, 2, 32
    keys = rng.standard_normal((1, kv_heads, context + 1, dim), dtype=np.float32)
    values = rng.standard_normal((1, kv_heads, context + 1, dim), dtype=np.float32)
    query = rng.standard_normal((1, heads, 1, dim), dtype=np.float32)
    alone = attention(query, keys, values, np.array([context]), np.ones((1, 1, 1), bool),
                      context, softcap, window)
    drafted = min(3, context)
    valid, free = context - drafted, 40
    # step nodes: the drafted ancestors (a chain), two siblings nobody sees, then x
    chain = keys[:, :, valid:], values[:, :, valid:]
    siblings = [rng.standard_normal((1, kv_heads, 2, dim), dtype=np.float32) for _ in range(2)]
    nan_slots = np.full((1, kv_heads, free, dim), np.nan, dtype=np.float32)
    cache_k = np.concatenate([keys[:, :, :valid], nan_slots], axis=2)
    cache_v = np.concatenate([values[:, :, :valid], nan_slots], axis=2)
    step_k = np.concatenate([cache_k, chain[0][:, :, :-1], siblings[0], chain[0][:, :, -1:]], 2)
    step_v = np.concatenate([cache_v, chain[1][:, :, :-1], siblings[1], chain[1][:, :, -1:]], 2)
    new = drafted + 3
    mask = np.tril(np.ones((new, new), bool))
    mask[:, drafted:drafted + 2] = False  # the siblings: seen by themselves only
    mask[drafted, drafted] = mask[drafted + 1, drafted + 1] = True
    q = rng.standard_normal((1, heads, new, dim), dtype=np.float32)
    q[:, :, -1] = query[:, :, 0]
    wide = attention(q, step_k, step_v, np.array([valid]), mask[None], valid + free, softcap,
                     window)
    np.testing.assert_array_equal(wide[:, :, -1:], alone)


def test_a_past_length_beyond_the_cache_is_refused(attention):
    q = np.zeros((1, 2, 1, 16), np.float32)
    k = np.zeros((1, 2, 5, 16), np.float32)
    with pytest.raises(Exception, match=r"leapc TreeAttention: a past_len is outside \[0, T\]"):
        attention(q, k, k, np.array([5]), np.ones((1, 1, 1), bool), 4)


def test_shapes_that_do_not_fit_are_refused(attention):
    q = np.zeros((1, 3, 1, 16), np.float32)  # 3 query heads over 2 KV heads
    k = np.zeros((1, 2, 5, 16), np.float32)
    with pytest.raises(Exception, match=r"leapc TreeAttention: q \[1, 3, 1, 16\] does not fit"):
        attention(q, k, k, np.array([4]), np.ones((1, 1, 1), bool), 4)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE in rotate-half form on the first ``2 * cos.shape[-1]`` inputs of ``x [B, H, N,
    D]``, as ONNX's RotaryEmbedding defines it; ``cos``/``sin`` are ``[B, N, R / 2]``."""
    half = cos.shape[-1]
    c, s = cos[:, None], sin[:, None]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return np.concatenate([c * x1 - s * x2, s * x1 + c * x2, rest], axis=-1)


@pytest.fixture(scope="module")
def rotary_attention(library):
    names = ("qkv", "cos", "sin", "k_past", "v_past", "past_len", "tree_mask")
    kinds = [TensorProto.FLOAT] * 5 + [TensorProto.INT64, TensorProto.BOOL]

    def run(qkv, cos, sin, k_past, v_past, past_len, tree_mask, heads):
        session = _one_node_session(library, "RotaryTreeAttention",
                                    list(zip(names, kinds, strict=True)),
                                    ["out", "k_new", "v_new"], scale=SCALE, num_heads=heads)
        feeds = (qkv, cos, sin, k_past, v_past, past_len, tree_mask)
        return session.run(None, dict(zip(names, feeds, strict=True)))

    return run


@pytest.mark.parametrize("heads, kv_heads, new, past, dim, rotary", [
    (10, 2, 1, 256, 32, 32),  # the bundled model's decode step
    (10, 2, 8, 40, 32, 32),
    (4, 4, 5, 17, 16, 8),  # partial rotary: the last 8 inputs pass through
])
def test_rotary_attention_is_the_attention_of_its_rotated_projections(
        rotary_attention, heads, kv_heads, new, past, dim, rotary):
    """The fused block (`fuse_rotary_attention`'s node): split, RoPE, attention, and the
    output in token-major order, with the rotated keys and the values as the step's."""
    rng = np.random.default_rng(heads * new + past)
    batch = 2
    qkv = rng.standard_normal((batch, new, (heads + 2 * kv_heads) * dim), dtype=np.float32)
    angles = rng.uniform(0, 50, (batch, new, rotary // 2)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    k_past = rng.standard_normal((batch, kv_heads, past, dim), dtype=np.float32)
    v_past = rng.standard_normal((batch, kv_heads, past, dim), dtype=np.float32)
    past_len, tree_mask = rng.integers(0, past + 1, batch), _random_tree(rng, batch, new)
    out, k_new, v_new = rotary_attention(qkv, cos, sin, k_past, v_past, past_len, tree_mask,
                                         heads)

    def heads_of(x, count):  # [B, N, count * D] -> [B, count, N, D]
        return x.reshape(batch, new, count, dim).transpose(0, 2, 1, 3)

    q, k, v = np.split(qkv, [heads * dim, (heads + kv_heads) * dim], axis=-1)
    q, k, v = _rotate(heads_of(q, heads), cos, sin), _rotate(heads_of(k, kv_heads), cos, sin), \
        heads_of(v, kv_heads)
    np.testing.assert_allclose(k_new, k, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(v_new, v)
    expected = reference.tree_attention(
        *map(torch.from_numpy, (q, np.concatenate([k_past, k], 2),
                                np.concatenate([v_past, v], 2), past_len, tree_mask)), SCALE)
    np.testing.assert_allclose(out, expected.numpy().transpose(0, 2, 1, 3).reshape(out.shape),
                               rtol=1e-5, atol=2e-6)


def test_rotary_attention_refuses_a_projection_of_another_width(rotary_attention):
    qkv = np.zeros((1, 1, 100), np.float32)
    cos = np.zeros((1, 1, 8), np.float32)
    cache = np.zeros((1, 2, 4, 16), np.float32)
    with pytest.raises(Exception, match=r"leapc RotaryTreeAttention: qkv \[1, 1, 100\] does "
                                         r"not fit 4 heads"):
        rotary_attention(qkv, cos, cos, cache, cache, np.array([4]), np.ones((1, 1, 1), bool), 4)
