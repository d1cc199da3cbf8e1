"""Restrict a draft program's vocabulary projection to the tokens drafts propose (FR-Spec).

A draft's logits only propose: verification runs the target's own head over the whole
vocabulary, so what a draft may propose changes how often it is accepted, never what is
emitted. Most of a vocabulary is rarely generated (the bundled model's greedy output on
held-out code uses 2 % of its 8192 tokens' ranks beyond the 2048 most frequent in its
corpus: none), yet a draft's head reads the whole ``[V, H]`` matrix every call, and on a
small model that matrix is a third of a draft call's bytes. FR-Spec (Zhao et al., 2025)
projects onto the most frequent tokens only; so does this pass:

    logits[..., ids] = h @ W[ids].T + b[ids],   logits[..., others] = -inf

Every ``linear`` whose weight has ``V`` rows (the LM head; the heads program's shared
head) becomes the projection onto ``W[ids]`` spread back into ``V`` columns, so the
program's signature, and every drafter reading it, is unchanged. ``-inf`` gives the
other tokens probability 0: a greedy draft never proposes them, and speculative sampling
stays exact, since its acceptance rule holds for any draft distribution.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from leapc.ir.capture import CapturedProgram
from leapc.ir.errors import InputError
from leapc.ir.rewrite import rewrite
from leapc.ir.vocabulary import spread
from leapc.passes.base import Invariant, PassError, PassResult

aten = torch.ops.aten
_IDS, _WEIGHT, _BIAS = "draft_vocabulary_ids", "draft_vocabulary_weight", "draft_vocabulary_bias"


def projected_tokens(program: CapturedProgram) -> int:
    """How many tokens ``program``'s vocabulary projection computes logits for."""
    ep = program.program
    ids = ep.state_dict.get(_IDS, ep.constants.get(_IDS))
    return program.dims.vocab_size if ids is None else int(ids.numel())


def _attribute(gm: GraphModule, node: Node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (None for any other argument)."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    return operator.attrgetter(node.target)(gm)


def _heads(gm: GraphModule, vocab_size: int) -> list[Node]:
    """The ``linear`` nodes projecting onto the vocabulary (a constant ``[V, H]`` weight)."""
    return [n for n in gm.graph.nodes if n.target == aten.linear.default
            and (weight := _attribute(gm, n.args[1])) is not None
            and weight.ndim == 2 and weight.shape[0] == vocab_size]


def _restrict(gm: GraphModule, ids: torch.Tensor, vocab_size: int) -> bool:
    heads = _heads(gm, vocab_size)
    if not heads:
        raise PassError("restrict_draft_vocabulary: no vocabulary projection (a linear with "
                        f"a [{vocab_size}, H] weight) in the program")
    weights = {id(_attribute(gm, h.args[1])) for h in heads}
    if len(weights) != 1:
        raise PassError(f"restrict_draft_vocabulary: {len(weights)} different vocabulary "
                        "projections; a draft program has one head")
    head = heads[0]
    weight = _attribute(gm, head.args[1])
    bias = _attribute(gm, head.args[2]) if len(head.args) > 2 else None
    gm.register_buffer(_IDS, ids)
    gm.register_buffer(_WEIGHT, weight.detach()[ids].clone())
    if bias is not None:
        gm.register_buffer(_BIAS, bias.detach()[ids].clone())
    for node in heads:
        with gm.graph.inserting_before(node):
            sub_weight = gm.graph.get_attr(_WEIGHT)
            sub_bias = (gm.graph.get_attr(_BIAS),) if bias is not None else ()
            projected = gm.graph.call_function(aten.linear.default,
                                               (node.args[0], sub_weight, *sub_bias))
            spread_out = gm.graph.call_function(spread, (projected, gm.graph.get_attr(_IDS),
                                                         vocab_size))
        node.replace_all_uses_with(spread_out)
        gm.graph.erase_node(node)
    return True


@dataclass(frozen=True)
class RestrictDraftVocabulary:
    """Project a draft's logits onto ``ids`` (sorted token ids) only."""

    ids: tuple[int, ...]
    name: ClassVar[str] = "restrict_draft_vocabulary"
    requires: ClassVar[frozenset[Invariant]] = frozenset({Invariant.SIGNATURE})
    ensures: ClassVar[frozenset[Invariant]] = frozenset({Invariant.SIGNATURE})

    def __call__(self, program: CapturedProgram) -> PassResult:
        vocab_size = program.dims.vocab_size
        if not self.ids or list(self.ids) != sorted(set(self.ids)) or self.ids[0] < 0 \
                or self.ids[-1] >= vocab_size:
            raise InputError(f"draft vocabulary: {len(self.ids)} ids, which must be distinct, "
                             f"sorted and within the model's {vocab_size} tokens")
        ids = torch.tensor(self.ids, dtype=torch.int64)
        return PassResult(*rewrite(program, lambda gm: _restrict(gm, ids, vocab_size)))
