"""TensorRT backend: Torch-TensorRT's dynamo compile of the exported step program.

The step program's dynamic dims become one TensorRT optimization profile per input
(`optimization_profiles`, a pure function of the `StepSignature`): min and max from the
signature's bounds of B, N and T, the optimum at one sequence, a small tree and half the
context. The compiled module is saved with ``torch_tensorrt.save`` as an exported program
(``<name>.ep``) and loaded with ``torch.export.load``. Needs CUDA and ``torch-tensorrt``
(``pip install 'leapc[tensorrt]'``); written against Torch-TensorRT's documented API and
tested only where CUDA exists (the CPU tests cover the profiles and the refusals).
"""

from __future__ import annotations

from pathlib import Path

from leapc.ir.errors import InputError
from leapc.runtime.backends.base import BackendImpl
from leapc.runtime.backends.eager import EagerStep
from leapc.runtime.manifest import Attention, Backend

PROGRAM_SUFFIX = ".ep"
OPT_NEW_TOKENS = 8  # the verify step's typical tree size: the shape TensorRT tunes for

Shape = tuple[int, ...]


def require() -> None:
    """Refuse in one line where the backend cannot run (checked before any compiling)."""
    try:
        import torch
        import torch_tensorrt  # noqa: F401
    except ModuleNotFoundError as err:
        raise InputError(f"the tensorrt backend needs {err.name} "
                         "(pip install 'leapc[tensorrt]' on a CUDA machine)") from None
    if not torch.cuda.is_available():
        raise InputError("the tensorrt backend needs a CUDA GPU; this machine has none")


def optimization_profiles(signature) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``input name -> (min, opt, max)`` shapes. The mask's ``T + N`` is capped at
    max-seq: the loop never runs a step past it, whatever B, N, T reach alone."""
    lo = {name: low for name, (low, _) in signature.bounds.items()}
    hi = {name: high for name, (_, high) in signature.bounds.items()}
    opt = {"B": lo["B"], "N": min(OPT_NEW_TOKENS, hi["N"]), "T": max(lo["T"], signature.max_seq // 2)}
    return {spec.name: tuple(_shape(spec.shape, values, signature.max_seq)
                             for values in (lo, opt, hi))
            for spec in signature.inputs}


def _shape(dims, values: dict[str, int], max_seq: int) -> Shape:
    import sympy

    symbols = {s: values[s.name] for s in sympy.symbols("B N T", integer=True, positive=True)}
    return tuple(min(int(sympy.sympify(d).subs(symbols)), max_seq) for d in dims)


def lower(program, out_dir: Path, name: str, attention: Attention) -> Path:
    """Compile a `CapturedProgram` with TensorRT; write ``out_dir/<name>.ep``."""
    import torch
    import torch_tensorrt

    require()
    signature = program.signature
    profiles = optimization_profiles(signature)
    dtypes = {spec.name: getattr(torch, spec.dtype) for spec in signature.inputs}
    inputs = [torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi,
                                   dtype=dtypes[name], name=name)
              for name, (lo, opt, hi) in profiles.items()]
    compiled = torch_tensorrt.dynamo.compile(program.program, arg_inputs=inputs,
                                             use_explicit_typing=True, device="cuda:0")
    examples = [torch.zeros(opt, dtype=dtypes[name], device="cuda")
                for name, (_, opt, _) in profiles.items()]
    path = out_dir / f"{name}{PROGRAM_SUFFIX}"
    torch_tensorrt.save(compiled, str(path), output_format="exported_program",
                        arg_inputs=examples)
    return path


def load_step(path: Path, output_names: tuple[str, ...]) -> EagerStep:
    """A saved TensorRT program, run on the GPU like the eager backend's programs."""
    require()
    import torch_tensorrt  # noqa: F401  (registers the TensorRT engine op the program calls)

    return EagerStep(path, output_names, device="cuda")


BACKEND = BackendImpl(
    # Always on the GPU, whatever ``--device`` says; dense attention: TensorRT has no
    # converter for the Python custom op (it would run it in torch between engine pieces).
    name=Backend.TENSORRT, default_attention=Attention.DENSE, lower=lower,
    load=lambda path, outputs, device: load_step(path, outputs),
    check_device=lambda device: require())
