"""insert_tree_attention: structure, numbers against the dense program on random trees,
refusals, and ORT / eager engines built with it."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from engines import tiny_source
from families import ATTN_SOFTCAP, SMALL_WINDOW, captured, family_params
from trees import tree_step_inputs

import leapc
from leapc.compiler import pipeline
from leapc.ir.anatomy import recover_anatomy
from leapc.ir.errors import InputError, UnsupportedModelError
from leapc.ir.rewrite import rewrite
from leapc.passes.base import Invariant, PassError, violation
from leapc.passes.insert_tree_attention import (
    CAPPED,
    SDPA,
    TREE_ATTENTION,
    InsertTreeAttention,
    Windows,
)
from leapc.runtime.backends import eager
from leapc.runtime.manifest import Attention

aten = torch.ops.aten


@functools.cache
def tree_program(family: str):
    result = InsertTreeAttention()(captured(family))
    assert result.modified
    return result.program


def call_counts(program) -> Counter:
    return Counter(n.target for n in program.program.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("family", family_params())
def test_every_sdpa_becomes_tree_attention_on_the_unrepeated_cache(family):
    """Expected per layer: tree_attention(q, keys_cat, values_cat, past_len, tree_mask, scale)
    with past_len and tree_mask computed once; repeat_kv's expands are gone."""
    before, after = captured(family), tree_program(family)
    layers = before.dims.num_layers
    assert call_counts(before)[SDPA] == layers
    assert call_counts(after)[SDPA] == 0
    assert call_counts(after)[TREE_ATTENTION] == layers
    assert call_counts(after)[aten.expand.default] == 0
    anatomy = recover_anatomy(after.program, layers, after.dims.hidden_size)
    nodes = {n.name: n for n in after.program.graph.nodes}
    calls = [nodes[layer.attention[0]] for layer in anatomy.layers]
    assert {c.target for c in calls} == {TREE_ATTENTION}
    for call, layer in zip(calls, anatomy.layers, strict=True):
        assert (call.args[1].name, call.args[2].name) == (layer.keys, layer.values)
        assert call.args[5] == 0.25  # the captured SDPA's scale (head_dim 16)
    assert len({(c.args[3], c.args[4]) for c in calls}) == 1  # the compact mask, once
    assert violation(Invariant.TREE_ATTENTION, before) is not None
    assert violation(Invariant.TREE_ATTENTION, after) is None


def _assert_equal_on_random_trees(family: str, program) -> None:
    dense, tree = captured(family).program.module(), program.program.module()
    # (B, N, T): one-token decode over one slot, a batch of trees, T + N = max_seq
    for seed, shape in enumerate([(1, 1, 1), (2, 6, 9), (3, 16, 48)]):
        inputs = tree_step_inputs(captured(family).dims, *shape, seed=seed)
        with torch.no_grad():
            want, got = dense(*inputs), tree(*inputs)
        for name, expected, actual in zip(("logits", "present"), want, got, strict=True):
            torch.testing.assert_close(actual, expected, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", family_params())
def test_tree_program_equals_the_dense_program_on_random_trees(family):
    _assert_equal_on_random_trees(family, tree_program(family))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "windowed"), [("gemma3_text", 1), ("mistral_window", 2)])
def test_sliding_window_layers_keep_dense_attention(family, windowed):
    """Windows.DENSE: those layers keep SDPA under the windowed mask (exact, past the window
    at T = 48); the others become tree attention."""
    result = InsertTreeAttention(Windows.DENSE)(captured(family))
    layers = captured(family).dims.num_layers
    assert call_counts(result.program)[SDPA] == windowed
    assert call_counts(result.program)[TREE_ATTENTION] == layers - windowed
    assert bool(result.modified) == (windowed < layers)
    assert violation(Invariant.TREE_ATTENTION, result.program) is None
    _assert_equal_on_random_trees(family, result.program)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "windowed"), [("gemma3_text", 1), ("mistral_window", 2)])
def test_sliding_window_layers_become_tree_attention_with_their_window(family, windowed):
    """Windows.TREE (the width-invariant lowerings): every layer is tree attention, a
    windowed one with the captured window (16) as the op's eighth argument, and the
    program equals the captured one on random trees past the window (T = 48)."""
    result = InsertTreeAttention(Windows.TREE)(captured(family))
    layers = captured(family).dims.num_layers
    assert call_counts(result.program)[SDPA] == 0
    tree = [n for n in result.program.program.graph.nodes if n.target == TREE_ATTENTION]
    assert Counter(n.args[6:] for n in tree) == Counter({(0.0, SMALL_WINDOW): windowed,
                                                         (): layers - windowed})
    assert violation(Invariant.TREE_ATTENTION, result.program) is None
    _assert_equal_on_random_trees(family, result.program)


@pytest.mark.slow
def test_soft_capped_layers_carry_their_cap_to_tree_attention():
    """Gemma 2 soft-caps its attention logits: its full layer becomes tree attention with
    the cap as the op's seventh argument, its windowed layer keeps the capped dense op, and
    the program equals the captured one on random trees (past the window at T = 48)."""
    before = captured("gemma2")
    result = InsertTreeAttention()(before)
    assert call_counts(before)[CAPPED] == 2
    assert call_counts(result.program)[CAPPED] == 1
    tree = [n for n in result.program.program.graph.nodes if n.target == TREE_ATTENTION]
    assert [n.args[6:] for n in tree] == [(ATTN_SOFTCAP,)]
    assert violation(Invariant.TREE_ATTENTION, result.program) is None
    _assert_equal_on_random_trees("gemma2", result.program)


def test_the_pass_needs_something_to_rewrite():
    with pytest.raises(PassError, match="no attention op"):
        InsertTreeAttention()(tree_program("llama"))


def test_an_attention_mask_other_than_the_step_mask_is_refused():
    """A soft additive bias (-1 instead of finfo.min) does not hide keys: no compact form."""
    def soften(gm):
        where = next(n for n in gm.graph.nodes if n.target == aten.where.Scalar)
        where.args = (*where.args[:2], -1.0)
        return True

    softened, _ = rewrite(captured("llama"), soften)
    with pytest.raises(UnsupportedModelError, match="attention mask is not the step mask"):
        InsertTreeAttention()(softened)


@pytest.mark.slow
def test_a_narrowing_other_than_the_captures_window_is_refused():
    """Tree attention knows one narrowing, ``positions - key_positions < W``: with ``<=``
    the mask is still narrowed, but not by that window, and carrying W would be wrong."""
    def widen(gm):
        window = next(n for n in gm.graph.nodes if n.target == aten.lt.Scalar)
        window.target = aten.le.Scalar
        return True

    widened, _ = rewrite(captured("mistral_window"), widen)
    with pytest.raises(UnsupportedModelError, match="other than a sliding window"):
        InsertTreeAttention(Windows.TREE)(widened)


def test_build_option_selects_the_pipeline():
    assert [p.name for p in pipeline(Attention.TREE).passes][-1] == "insert_tree_attention"
    assert "insert_tree_attention" not in [p.name for p in pipeline(Attention.DENSE).passes]
    # windows go into tree attention where every layer must be width-invariant
    assert {a: pipeline(a).passes[-1].windows for a in (Attention.TREE, Attention.INVARIANT,
                                                         Attention.KERNEL)} == \
        {Attention.TREE: Windows.DENSE, Attention.INVARIANT: Windows.TREE,
         Attention.KERNEL: Windows.TREE}
    with pytest.raises(InputError, match="unknown attention lowering 'sparse'"):
        leapc.build("bundled", "unused", attention="sparse")


@pytest.mark.slow
def test_eager_engine_file_loads_in_a_fresh_process(tmp_path):
    """The .pt2 calls leapc.tree_attention: loading it must declare the op first."""
    path = eager.lower(tree_program("llama"), tmp_path, "full", Attention.TREE)
    code = ("import sys; from leapc.runtime.backends.eager import EagerStep; "
            "EagerStep(sys.argv[1], ('logits', 'present'))")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


@pytest.fixture(scope="module")
def ort_engines(engine_dir, tmp_path_factory):
    """The tiny Llama's ORT engines with each attention lowering: the session's (built with
    the default lowering), and one built here with the other."""
    default = leapc.load(engine_dir("tiny-llama", "ort"))
    lowered = "insert_tree_attention" in default.manifest.passes
    other = "dense" if lowered else "tree"
    engines = {"tree" if lowered else "dense": default}
    engines[other] = leapc.load(leapc.build(tiny_source("llama"), tmp_path_factory.mktemp(other),
                                            "ort", attention=other, max_seq=256))
    return engines


@pytest.mark.slow
def test_ort_tree_engine_matches_the_dense_engine(ort_engines):
    dense, tree = ort_engines["dense"], ort_engines["tree"]
    assert tree.manifest.passes[-1] == "insert_tree_attention"
    assert "insert_tree_attention" not in dense.manifest.passes
    dims = captured("llama").dims
    for seed, shape in enumerate([(1, 1, 64), (2, 9, 64), (1, 32, 192)]):
        inputs = [t.numpy() for t in tree_step_inputs(dims, *shape, seed=seed)]
        want, got = dense.step(*inputs), tree.step(*inputs)
        for name in ("logits", "present"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ort_engines_use_fused_opset_23_ops(ort_engines):
    """Decomposed attention, norms or RoPE (a lower opset, an exporter change) cost ~30% of
    a step; and the tree engine's layers share one attention mask."""
    layers = captured("llama").dims.num_layers
    for attention, engine in ort_engines.items():
        graph = onnx.load(str(engine.path / engine.manifest.programs["full"].file)).graph
        ops = Counter(n.op_type for n in graph.node)
        assert (ops["Attention"], ops["RotaryEmbedding"], ops["Softmax"]) == (layers, 2 * layers, 0)
        assert ops["RMSNormalization"] == 2 * layers + 1  # per layer, and the final norm
        if attention == "tree":
            assert ops["Range"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("policy", ("ar", "recycle"))
def test_ort_tree_engine_generates_the_same_greedy_tokens(ort_engines, policy):
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    dense = ort_engines["dense"].generate(prompt, 48, policy=policy)
    tree = ort_engines["tree"].generate(prompt, 48, policy=policy)
    assert tree.token_ids == dense.token_ids
