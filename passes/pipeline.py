"""Run passes in the order given, checking the contract around each one.

Around every pass: its ``requires`` hold, it runs, its ``ensures`` hold, ``graph.lint()``
and ``ExportedProgram.validate()`` pass, and (optionally) the graph code is written to
``dump_dir/NN_<name>.py``. A failure re-raises as `PassError` naming the pass and those
that ran before it; a user's mistake a pass finds (`LeapcUserError`: a bad option, an
unsupported model) stays what it is, so the CLI reports it as one line. After the last
pass, `check_numerics` compares the result with the source model on random inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from leapc.ir.capture import STEP_OUTPUTS, CapturedProgram, example_inputs
from leapc.ir.errors import LeapcUserError
from leapc.passes.base import Invariant, Pass, PassError, violation
from leapc.passes.fold_constants import FoldConstants
from leapc.passes.remove_noop_ops import RemoveNoopOps


@dataclass(frozen=True)
class PipelineResult:
    program: CapturedProgram
    ran: tuple[str, ...]
    modified: tuple[str, ...]


def _context(name: str, before: Sequence[str]) -> str:
    return f"pass {name!r} (after {', '.join(before) or 'capture'})"


def _check(p: Pass, when: str, invariants, program: CapturedProgram, before) -> None:
    # In declaration order, not the set's: the same failure is reported on every run.
    for inv in [inv for inv in Invariant if inv in invariants]:
        problem = violation(inv, program)
        if problem:
            raise PassError(f"{_context(p.name, before)}: {when} {inv.name} violated: {problem}")


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[Pass, ...]
    dump_dir: Path | None = None

    def __call__(
        self, program: CapturedProgram, on_pass: Callable[[str], None] = lambda _: None
    ) -> PipelineResult:
        ran: list[str] = []
        modified: list[str] = []
        for index, p in enumerate(self.passes):
            on_pass(p.name)
            _check(p, "required", p.requires, program, ran)
            try:
                result = p(program)
                result.program.program.graph.lint()
                result.program.program.validate()
            except (PassError, LeapcUserError):
                raise
            except Exception as err:
                raise PassError(f"{_context(p.name, ran)}: {type(err).__name__}: {err}") from err
            _check(p, "ensured", p.ensures, result.program, ran)
            program = result.program
            ran.append(p.name)
            if result.modified:
                modified.append(p.name)
            if self.dump_dir is not None:
                self._dump(index, p.name, program)
        return PipelineResult(program, tuple(ran), tuple(modified))

    def _dump(self, index: int, name: str, program: CapturedProgram) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        code = program.program.graph_module.print_readable(print_output=False)
        (self.dump_dir / f"{index:02d}_{name}.py").write_text(code)


def default_pipeline(dump_dir: Path | None = None) -> Pipeline:
    """The cleanups every engine gets."""
    return Pipeline((FoldConstants(), RemoveNoopOps()), dump_dir)


def check_numerics(
    source: torch.nn.Module, program: CapturedProgram, shapes=((1, 1, 7), (2, 5, 3))
) -> None:
    """Every original output of the transformed program matches the source step module.

    ``shapes`` are (B, N, T) triples: a decode step and a multi-token chunk by default.
    """
    module = program.program.module()
    for batch, new, past in shapes:
        inputs = example_inputs(program.dims, batch, new, past)
        with torch.no_grad():
            expected = source(*inputs)
            actual = module(*inputs)
        for name, want, got in zip(STEP_OUTPUTS, expected, actual, strict=False):
            try:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            except AssertionError as err:
                raise PassError(f"pipeline numeric check: output {name!r} differs from "
                                f"the source model at B={batch} N={new} T={past}: {err}") from err
