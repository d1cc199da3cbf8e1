"""Add decoding heads (Medusa, Hydra) to the step program (DESIGN §4, `leapc.ir.heads`).

The heads read the hidden state the LM head reads (after the final norm), which the
anatomy finds in any family. Where they run is the placement:

- ``STEP``: in the step program, at every node: adds ``head_logits [K, B, N, V]``. One
  call does everything, but a verify step over N nodes pays K*N vocabulary projections,
  of which the next draft uses the K at one node (the last accepted).
- ``PROGRAM``: the step program only exposes that hidden state as ``hidden [B, N, H]``;
  the heads are a separate ``heads`` program (`leapc.ir.heads.capture_heads`) the drafter
  calls on the one row it needs. Hydra heads need this form anyway: head k reads the token
  drafted at depth k - 1, which exists only while drafting.

On a CPU the vocabulary projections dominate a small model's step, so ``PROGRAM`` is the
default there (numbers in docs/decisions.md); ``STEP`` saves a call where compute is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from torch.fx import GraphModule, Node

from leapc.ir import signature as sig
from leapc.ir.anatomy import Anatomy, anatomy_of
from leapc.ir.capture import CapturedProgram
from leapc.ir.errors import InputError
from leapc.ir.head_spec import HeadPlacement
from leapc.ir.heads import DecodingHeads, project
from leapc.ir.rewrite import reexport, set_outputs, unlift
from leapc.passes.base import Invariant, PassError, PassResult


class _StepHeads(nn.Module):
    """``hidden [B, N, H] -> head_logits [K, B, N, V]`` through the model's own LM head."""

    def __init__(self, heads: DecodingHeads):
        super().__init__()
        self.heads = heads

    def forward(self, hidden, lm_weight, lm_bias=None):
        rows = hidden.reshape(-1, hidden.shape[-1])
        logits = project(self.heads.states(rows), lm_weight, lm_bias)
        return logits.reshape(logits.shape[0], *hidden.shape[:-1], logits.shape[-1])


def _weight(gm: GraphModule, name: str) -> Node:
    """The unlifted graph's ``get_attr`` of parameter ``name`` (the LM head's weight)."""
    found = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    if not found:
        raise PassError(f"insert_decoding_heads: no get_attr of {name} in the unlifted graph")
    return found[0]


@dataclass(frozen=True)
class InsertDecodingHeads:
    heads: DecodingHeads
    placement: HeadPlacement = HeadPlacement.PROGRAM

    name: ClassVar[str] = "insert_decoding_heads"
    requires: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY})
    ensures: ClassVar[frozenset[Invariant]] = frozenset(
        {Invariant.STEP_CONTRACT, Invariant.HAS_ANATOMY})

    def __post_init__(self):
        if self.heads.is_hydra and self.placement is HeadPlacement.STEP:
            raise InputError("Hydra heads read the drafted tokens, so they cannot run inside "
                             "the step program: use the program placement")

    def __call__(self, program: CapturedProgram) -> PassResult:
        anatomy = anatomy_of(program)
        gm = unlift(program)
        hidden = next(n for n in gm.graph.nodes if n.name == anatomy.final_norm)
        outputs = list(gm.graph.output_node().args[0])
        with gm.graph.inserting_before(gm.graph.output_node()):
            added, spec = self._output(gm, hidden, anatomy, program)
        set_outputs(gm, [*outputs, added])
        return PassResult(reexport(gm, program, (*program.signature.outputs, spec)), True)

    def _output(self, gm: GraphModule, hidden: Node, anatomy: Anatomy,
                program: CapturedProgram) -> tuple[Node, sig.TensorSpec]:
        dims = program.dims
        if self.placement is HeadPlacement.PROGRAM:
            return hidden, sig.TensorSpec("hidden", dims.dtype,
                                          (sig.B, sig.N, dims.hidden_size))
        gm.add_submodule("decoding_heads", _StepHeads(self.heads))
        weights = [_weight(gm, anatomy.lm_head_weight)]
        if anatomy.lm_head_bias:
            weights.append(_weight(gm, anatomy.lm_head_bias))
        logits = gm.graph.call_module("decoding_heads", (hidden, *weights))
        k = self.heads.config.num_heads
        return logits, sig.TensorSpec("head_logits", dims.dtype,
                                      (k, sig.B, sig.N, dims.vocab_size))
