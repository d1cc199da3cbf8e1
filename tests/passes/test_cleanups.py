"""The cleanup passes on real captured graphs: structure (op counts) and numbers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from families import captured, family_params, tiny_model

from leapc.ir.anatomy import recover_anatomy
from leapc.ir.capture import StepModule
from leapc.ir.graph import is_noop
from leapc.passes.base import Invariant, violation
from leapc.passes.fold_constants import FoldConstants
from leapc.passes.pipeline import check_numerics
from leapc.passes.remove_noop_ops import RemoveNoopOps

aten = torch.ops.aten


def op_counts(program) -> Counter:
    return Counter(n.target for n in program.program.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("family", family_params())
def test_remove_noop_ops_removes_identity_casts_and_aliases(family):
    before = captured(family)
    noops_before = [n for n in before.program.graph.nodes if is_noop(n)]
    assert noops_before, "captured transformers graphs contain identity casts / aliases"
    result = RemoveNoopOps()(before)
    assert result.modified
    after = result.program
    assert not [n for n in after.program.graph.nodes if is_noop(n)]
    assert sum(op_counts(after).values()) < sum(op_counts(before).values())
    # the real work is untouched: same attention ops, same projections
    for op in (aten.scaled_dot_product_attention.default, aten.embedding.default):
        assert op_counts(after)[op] == op_counts(before)[op]
    assert violation(Invariant.NO_NOOP_OPS, after) is None
    assert violation(Invariant.HAS_ANATOMY, after) is None
    check_numerics(StepModule(tiny_model(family)), after)


def test_remove_noop_ops_is_idempotent():
    once = RemoveNoopOps()(captured("llama")).program
    again = RemoveNoopOps()(once)
    assert not again.modified
    assert again.program is once


@pytest.mark.parametrize("family", family_params(("llama", "qwen3", "gemma")))
def test_fold_constants_folds_rope_inverse_frequencies(family):
    before = captured(family)
    assert violation(Invariant.CONSTANTS_FOLDED, before) is not None
    result = FoldConstants()(before)
    assert result.modified
    after = result.program
    assert violation(Invariant.CONSTANTS_FOLDED, after) is None
    folded = [name for name in after.program.constants if "_folded_constant" in name]
    folded += [t for t in after.program.state_dict if "_folded_constant" in t]
    assert folded, "the folded values are stored as new constants"
    # Weights are never folded (no duplicated parameter copies).
    params_before = sum(p.numel() for p in before.program.parameters())
    params_after = sum(p.numel() for p in after.program.parameters())
    assert params_after == params_before
    check_numerics(StepModule(tiny_model(family)), after)
    anatomy = recover_anatomy(after.program, 2, 64)
    assert len(anatomy.layers) == 2
