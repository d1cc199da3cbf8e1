"""Unroll a greedy draft chain into one program: k draft steps for one call (issue 16).

A drafter that grows a chain calls its step program once per drafted token, and on a
small model every call costs more in fixed overhead (binding, thread wake-ups, the
runtime's own input building) than in arithmetic. This pass composes ``calls`` copies of
a step program into one:

    call 0   the given tokens (the drafter's catch-up, its root last), as the step would;
    call i   one token, the argmax of call i - 1's last logits row, at the next position,
             attending to ``past``, every row calls 0..i-1 wrote, and itself.

The chain program's inputs are the step's; its outputs are the step's, each row-wise one
(``N`` on some axis: logits, present, hidden) concatenated over the calls (``N`` becomes
``N + calls - 1``), then ``drafted [B, depth]``: the argmax of calls 0..depth-1, the
chain's tokens after the root. ``calls`` is ``depth`` when the last drafted token need not
be fed (a draft model: its rows are scratch anyway), ``depth + 1`` when it must (an
early exit: verification reads the hidden state of every chain node).

Only greedy chains: a sampled chain needs the drafter's random draws between calls.
The rows a call reads are ``past`` and the earlier calls' ``present`` concatenated, so
``T + N + calls - 1 <= max_seq``: the chain program's own ``max_seq`` is that much lower.

Concatenated whole, call i's past would be a copy of the cache that its layers then copy
again when they select their own rows. So the composed graph selects first: a layer's
``select`` of a ``cat`` becomes a ``cat`` of the parts' selections, a ``select`` of a
``stack`` (``present``) the stacked row, and a ``cat`` whose only reader is a ``cat`` on
the same axis is inlined into it. Every layer of every call then reads ``past`` as the
step does (``past[l][kv]``, which the ONNX lowering feeds per layer) and concatenates
the chain's rows once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from leapc.ir.capture import CapturedProgram, CaptureOptions, export_step
from leapc.ir.rewrite import capture_options, rewrite, unlift
from leapc.ir.signature import B, N, StepSignature, TensorSpec
from leapc.passes.base import Invariant, PassError, PassResult
from leapc.runtime.step import DRAFTED

aten = torch.ops.aten

_T_AXIS = 4  # past / present: [L, 2, B, Hkv, T, Dh]


@dataclass(frozen=True)
class UnrollDraftChain:
    depth: int
    closing_call: bool = False
    name: ClassVar[str] = "unroll_draft_chain"
    requires: ClassVar[frozenset[Invariant]] = frozenset({Invariant.STEP_CONTRACT})
    ensures: ClassVar[frozenset[Invariant]] = frozenset({Invariant.SIGNATURE})

    @property
    def calls(self) -> int:
        return self.depth + self.closing_call

    def __call__(self, program: CapturedProgram) -> PassResult:
        if self.depth < 1:
            raise PassError(f"{self.name}: depth must be at least 1 (got {self.depth})")
        signature = _chain_signature(program.signature, self.depth, self.calls)
        axes = tuple(_row_axis(spec) for spec in program.signature.outputs)
        chain = _Chain(unlift(program), self.depth, self.calls, axes)
        options = capture_options(program)
        options = CaptureOptions(max_seq=signature.max_seq, max_batch=options.max_batch,
                                 max_new=options.max_new)
        with torch.no_grad():
            exported = export_step(chain, program.dims, options)
        composed = CapturedProgram(exported, signature, program.dims)
        return PassResult(rewrite(composed, select_before_concatenating)[0], True)


class _Chain(torch.nn.Module):
    def __init__(self, step: torch.nn.Module, depth: int, calls: int, axes: tuple[int | None, ...]):
        super().__init__()
        self.step, self.depth, self.calls, self.axes = step, depth, calls, axes

    def forward(self, tokens, positions, past, mask):
        outputs = [self.step(tokens, positions, past, mask)]
        seen = mask[:, -1:]  # what the last given token attends to: every later call too
        drafted = []
        for i in range(1, self.calls):
            logits, present = outputs[-1][:2]
            drafted.append(logits[:, -1:].argmax(-1))
            past = torch.cat([past, present], dim=_T_AXIS)
            itself = torch.ones_like(seen[..., :1])
            seen = torch.cat([seen, itself], dim=2)
            outputs.append(self.step(drafted[-1], positions[:, -1:] + i, past, seen))
        if len(drafted) < self.depth:
            drafted.append(outputs[-1][0][:, -1:].argmax(-1))
        rows = [torch.cat([out[k] for out in outputs], dim=axis) if axis is not None
                else outputs[-1][k] for k, axis in enumerate(self.axes)]
        return (*rows, torch.cat(drafted, dim=1))


def _row_axis(spec: TensorSpec) -> int | None:
    """The axis of ``spec`` that counts the step's tokens, if any."""
    return next((axis for axis, dim in enumerate(spec.shape) if dim == N), None)


def _chain_signature(signature: StepSignature, depth: int, calls: int) -> StepSignature:
    extra = calls - 1
    outputs = tuple(
        TensorSpec(s.name, s.dtype, tuple(d + extra if d == N else d for d in s.shape))
        for s in signature.outputs
    )
    return dataclasses.replace(
        signature,
        outputs=(*outputs, TensorSpec(DRAFTED, "int64", (B, depth))),
        bounds=signature.bounds | {"T": (1, signature.max_seq - extra - 1)},
        max_seq=signature.max_seq - extra,
    )


def select_before_concatenating(gm: GraphModule) -> bool:
    """Push ``select`` through ``cat`` and ``stack``, then flatten nested ``cat``s, until
    nothing changes; whether anything did."""
    changed = False
    while any(_rewrite(node) for node in list(gm.graph.nodes)):
        changed = True
        gm.graph.eliminate_dead_code()
    return changed


def _rewrite(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target == aten.select.int:
        return _select_part(node)
    if node.target == aten.cat.default:
        return _stack_of_cats(node) or _inline_cats(node)
    return False


def _select_part(node: Node) -> bool:
    """``cat(xs, d)[i]`` on another axis is ``cat(x[i] for x in xs)``; ``stack(xs, d)[i]``
    on the same axis is ``xs[i]``."""
    source, axis, index = node.args
    axis %= _rank(source)
    if source.target == aten.cat.default:
        parts, along = source.args[0], _axis(source)
        if along == axis:
            return False
        with node.graph.inserting_before(node):
            picked = [node.graph.call_function(aten.select.int, (p, axis, index)) for p in parts]
            replacement = node.graph.call_function(
                aten.cat.default, (picked, along - (along > axis)))
    elif source.target == aten.stack.default and (_axis(source) == axis):
        replacement = source.args[0][index]
    else:
        return False
    node.replace_all_uses_with(replacement)
    return True


def _stack_of_cats(node: Node) -> bool:
    """``cat([stack(a, d), stack(b, d)], e)`` on another axis is
    ``stack([cat([a[i], b[i]], e') for i], d)``: the calls' ``present`` rows joined layer by
    layer, so the stacked output keeps the step's per-layer form (which the ONNX lowering
    returns one layer at a time) instead of a concatenation of stacks."""
    parts = node.args[0]
    if not parts or any(p.op != "call_function" or p.target != aten.stack.default
                        or len(p.users) != 1 for p in parts):
        return False
    along, inner = _axis(parts[0]), _axis(node)
    if inner == along or any(_axis(p) != along or len(p.args[0]) != len(parts[0].args[0])
                             for p in parts):
        return False
    with node.graph.inserting_before(node):
        cats = [node.graph.call_function(aten.cat.default,
                                         ([p.args[0][i] for p in parts], inner - (inner > along)))
                for i in range(len(parts[0].args[0]))]
        replacement = node.graph.call_function(aten.stack.default, (cats, along))
    node.replace_all_uses_with(replacement)
    return True


def _inline_cats(node: Node) -> bool:
    """``cat([cat([a, b], d), c], d)`` is ``cat([a, b, c], d)`` when the inner one has no
    other reader."""
    axis, parts, flat = _axis(node), node.args[0], []
    for part in parts:
        inner = part.op == "call_function" and part.target == aten.cat.default \
            and len(part.users) == 1 and _axis(part) == axis
        flat.extend(part.args[0] if inner else [part])
    if len(flat) == len(parts):
        return False
    node.args = (flat, *node.args[1:])
    return True


def _axis(node: Node) -> int:
    """The (non-negative) axis a ``cat`` or ``stack`` joins along."""
    axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return axis % _rank(node)


def _rank(node: Node) -> int:
    """From the traced value, or for a node this rewrite made, from what it reads."""
    if "val" in node.meta:
        return node.meta["val"].dim()
    if node.target == aten.select.int:
        return _rank(node.args[0]) - 1
    if node.target == aten.stack.default:
        return _rank(node.args[0][0]) + 1
    return _rank(node.args[0][0])  # a cat: its parts' rank
