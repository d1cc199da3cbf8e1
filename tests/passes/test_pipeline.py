"""The pipeline's contract: requires/ensures, lint/validate, dumps, errors, numeric check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from families import captured, tiny_model

from leapc.ir.capture import StepModule
from leapc.ir.errors import InputError
from leapc.ir.graph import layer_presents, stack_presents
from leapc.ir.rewrite import reexport, rewrite, set_outputs, unlift
from leapc.passes.base import Invariant, PassError, PassResult
from leapc.passes.fold_constants import FoldConstants
from leapc.passes.pipeline import Pipeline, check_numerics, default_pipeline
from leapc.passes.remove_noop_ops import RemoveNoopOps


@dataclass(frozen=True)
class NeedsFoldedConstants:
    """A pass that may only run after constant folding."""

    name: ClassVar[str] = "needs_folded_constants"
    requires: ClassVar[frozenset] = frozenset({Invariant.CONSTANTS_FOLDED})
    ensures: ClassVar[frozenset] = frozenset()

    def __call__(self, program):
        return PassResult(program, False)


@dataclass(frozen=True)
class ScaleLogits:
    """A wrong rewrite: doubles the logits (keeps the contract, breaks the numbers)."""

    name: ClassVar[str] = "scale_logits"
    requires: ClassVar[frozenset] = frozenset()
    ensures: ClassVar[frozenset] = frozenset({Invariant.STEP_CONTRACT})

    def __call__(self, program):
        def edit(gm):
            out = gm.graph.output_node()
            logits = out.args[0][0]
            with gm.graph.inserting_before(out):
                doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (logits, 2.0))
            out.args = ((doubled, *out.args[0][1:]),)
            return True

        return PassResult(*rewrite(program, edit))


@dataclass(frozen=True)
class DropPresent:
    """Breaks the step contract by dropping the ``present`` output."""

    name: ClassVar[str] = "drop_present"
    requires: ClassVar[frozenset] = frozenset()
    ensures: ClassVar[frozenset] = frozenset({Invariant.STEP_CONTRACT})

    def __call__(self, program):
        gm = unlift(program)
        set_outputs(gm, [gm.graph.output_node().args[0][0]])
        return PassResult(reexport(gm, program), True)


@dataclass(frozen=True)
class DropLastLayerRows:
    """Re-stacks ``present`` without the last layer but keeps the signature: a broken cut."""

    name: ClassVar[str] = "drop_last_layer_rows"
    requires: ClassVar[frozenset] = frozenset()
    ensures: ClassVar[frozenset] = frozenset({Invariant.SIGNATURE, Invariant.KV_LAYERS})

    def __call__(self, program):
        gm = unlift(program)
        logits, _ = gm.graph.output_node().args[0]
        rows = layer_presents(gm, program.dims.num_layers)[:-1]
        set_outputs(gm, [logits, stack_presents(gm, rows)])
        return PassResult(reexport(gm, program), True)


@dataclass(frozen=True)
class RefuseTheOption:
    """Finds a user's mistake."""

    name: ClassVar[str] = "refuse_the_option"
    requires: ClassVar[frozenset] = frozenset()
    ensures: ClassVar[frozenset] = frozenset()

    def __call__(self, program):
        raise InputError("refuse_the_option: --option 3 is out of range")


def test_requires_is_checked_before_the_pass_runs():
    with pytest.raises(PassError, match=r"needs_folded_constants.*after capture.*required "
                                        r"CONSTANTS_FOLDED violated"):
        Pipeline((NeedsFoldedConstants(),))(captured("llama"))


def test_requires_holds_once_the_pass_that_ensures_it_ran():
    result = Pipeline((FoldConstants(), NeedsFoldedConstants()))(captured("llama"))
    assert result.ran == ("fold_constants", "needs_folded_constants")
    assert result.modified == ("fold_constants",)


def test_ensures_failure_names_the_pass_and_its_predecessors():
    with pytest.raises(PassError, match=r"'drop_present' \(after remove_noop_ops\).*"
                                        r"STEP_CONTRACT"):
        Pipeline((RemoveNoopOps(), DropPresent()))(captured("llama"))


def test_numeric_check_catches_a_wrong_rewrite():
    result = Pipeline((ScaleLogits(),))(captured("llama"))
    with pytest.raises(PassError, match="output 'logits' differs"):
        check_numerics(StepModule(tiny_model("llama")), result.program)


def test_default_pipeline_dumps_each_pass_and_matches_the_source(tmp_path):
    result = default_pipeline(tmp_path)(captured("qwen2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_fold_constants.py", "01_remove_noop_ops.py"]
    assert "scaled_dot_product_attention" in (tmp_path / "01_remove_noop_ops.py").read_text()
    check_numerics(StepModule(tiny_model("qwen2")), result.program)


def test_a_cut_that_loses_a_layer_of_present_breaks_kv_layers():
    with pytest.raises(PassError, match=r"'drop_last_layer_rows' \(after capture\): ensured "
                                        r"KV_LAYERS violated: present holds 1 layers, the "
                                        r"signature declares 2"):
        Pipeline((DropLastLayerRows(),))(captured("llama"))


def test_a_user_error_a_pass_finds_stays_a_user_error():
    with pytest.raises(InputError, match="refuse_the_option: --option 3 is out of range"):
        Pipeline((RemoveNoopOps(), RefuseTheOption()))(captured("llama"))
