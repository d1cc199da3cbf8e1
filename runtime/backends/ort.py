"""ONNX Runtime backend: lower with the dynamo ONNX exporter, run with the CPU EP.

Loading and running import only numpy and onnxruntime (edge deployments have no torch).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnxruntime as ort

from leapc.ir.errors import InputError
from leapc.kernels.ort_ops import WeightFormat, compile_library, library_file
from leapc.runtime.backends.base import (
    BackendImpl,
    Compression,
    Device,
    thread_count,
)
from leapc.runtime.backends.ort_shared_weights import share_weights, shared_weights
from leapc.runtime.manifest import Attention, Backend

PROGRAM_SUFFIX = ".onnx"


def lower(program, out_dir: Path, name: str, attention: Attention) -> Path:
    """Export a `CapturedProgram` to ``out_dir/<name>.onnx`` (weights inline); tree attention
    as the fused ``Attention`` node, width-invariant (``Attention.INVARIANT``), or leapc's
    kernel (``Attention.KERNEL``, its library compiled beside the program)."""
    import logging

    import onnx
    import torch

    from leapc.ir.capture import ADAPTER_PAST, ADAPTER_PRESENT
    from leapc.kernels.onnx_translations import OPSET, translations
    from leapc.runtime.backends.onnx_kv_by_layer import (
        PAST,
        PRESENT,
        split_past_by_layer,
        split_present_by_layer,
    )

    # The exporter warns once per torchvision op it cannot register; none are used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    path = out_dir / f"{name}{PROGRAM_SUFFIX}"
    output_names = [s.name for s in program.signature.outputs]
    onnx_program = torch.onnx.export(
        program.program,
        input_names=[s.name for s in program.signature.inputs],
        output_names=output_names,
        # leapc's custom ops, as standard ONNX ops
        custom_translation_table=translations(attention),
        opset_version=OPSET,
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    onnx_program.save(str(path))  # weights over 2 GB go to external data
    model = onnx.load(str(path), load_external_data=False)  # external weights stay put
    for past, present in ((PAST, PRESENT), (ADAPTER_PAST, ADAPTER_PRESENT)):
        split_past_by_layer(model, past)
        split_present_by_layer(model, present)
    onnx.save_model(model, str(path))
    if attention is Attention.KERNEL:
        compile_library(library_file(path))
    return path


def quantize_weights(path: Path, bits: int = 8) -> None:
    """Rewrite ``path`` with weight-only quantized MatMuls (``MatMulNBits``: symmetric
    integer weights, one float scale per 32 input rows of each column), in place: every
    MatMul with a constant weight, the vocabulary projection included (a tied one through
    `transpose_constant_weights`), the largest of them on small models. Embeddings and norms stay float32.
    (`use_leapc_kernels` with ``WeightFormat.Q8`` is the same scheme in leapc's own kernel.)

    ``accuracy_level`` 4 lets ORT quantize each activation block to int8 on the fly and
    multiply in int8 (VNNI / AMX): measured on the bundled model, 2.06 ms a step against
    2.66 ms in float32, while level 1 (dequantize the weights, multiply in float32) took
    11.7 ms. So the weights are what is stored quantized, and the arithmetic is int8 too.
    """
    _quantize(_load_for_packed_weights(path), path, bits, 32, exclude=())


def use_leapc_kernels(path: Path, weights: WeightFormat) -> None:
    """Rewrite ``path`` with leapc's GEMM ops in ``weights``' format (``Q8MatMul``: int8
    weights per 32 inputs, int8 activations per 32 on the fly, as ``MatMulNBits`` at
    accuracy level 4; ``BF16MatMul``: bfloat16 weights, float32 arithmetic), in place, and
    compile the custom-op library beside it (`leapc.kernels.ort_ops.library_file`).

    ``MatMulNBits`` costs ~M times its one-row time for M rows (a verify step of 8 tokens
    cost ~2x a step of one on the bundled model); leapc's kernels read each group of
    weights once for several rows, and a row's result does not depend on the rows beside
    it (docs/decisions.md, "leapc's int8 kernel")."""
    import onnx

    from leapc.runtime.backends.onnx_fuse_attention import fuse_rotary_attention
    from leapc.runtime.backends.onnx_fuse_matmul_neighbours import fold_into_leapc_matmuls
    from leapc.runtime.backends.onnx_leapc_matmul import use_leapc_matmuls

    model = _load_for_packed_weights(path)
    use_leapc_matmuls(model, weights)
    fuse_rotary_attention(model)  # on `--attention kernel` programs (after the q/k/v fusion)
    fold_into_leapc_matmuls(model)
    onnx.save_model(model, str(path))
    if not library_file(path).exists():  # an --attention kernel program has it already
        compile_library(library_file(path))


def _load_for_packed_weights(path: Path):
    """The program at ``path`` with every weight a packed-weight kernel may take as a
    constant MatMul operand: transposed weights made constants (a tied vocabulary
    projection untied from the embedding table, which keeps its float copy for the lookup)
    and sibling projections fused (exact in leapc's kernels, whose columns do not depend
    on their neighbours, and in MatMulNBits; float32 programs stay unfused)."""
    import onnx

    from leapc.runtime.backends.onnx_fuse_projections import fuse_sibling_projections
    from leapc.runtime.backends.onnx_graph import transpose_constant_weights

    model = onnx.load(str(path))
    transpose_constant_weights(model.graph)
    fuse_sibling_projections(model)
    return model


def quantize_vocab_projection(path: Path, vocab_size: int, bits: int = 8) -> list[str]:
    """Quantize only the MatMuls that project onto the vocabulary, in place; return their
    node names.

    For programs that only draft (an early-exit draft): the projection is most of the
    bytes a one-token call reads (8192 x 320 floats on the bundled model: 0.87 -> 0.51 ms
    a call in int8), while the hidden states and KV rows, which the target reuses, stay
    exact.
    """
    import onnx

    from leapc.runtime.backends.onnx_graph import transpose_constant_weights

    model = onnx.load(str(path))
    transpose_constant_weights(model.graph)  # a tied head's table: a constant [H, V] weight
    projections = _vocab_projections(model, vocab_size)
    if not projections:
        raise ValueError(f"{path.name}: no MatMul projects onto the {vocab_size}-token vocabulary")
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in projections]
    _quantize(model, path, bits, 32, exclude=others)
    return projections


def _vocab_projections(model, vocab_size: int) -> list[str]:
    """The MatMuls that project onto the vocabulary: by a constant ``[H, V]`` weight, V
    ``vocab_size`` or a draft's restricted vocabulary's size."""
    tables = {i.name: i for i in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in tables
            and tables[node.input[1]].dims[-1] == vocab_size]


def _quantize(model, path: Path, bits: int, block_size: int, exclude) -> None:
    """Every MatMul with a constant weight, except the nodes named in ``exclude``."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # Importing the quantizer runs logging.basicConfig(level=INFO), which would print every
    # later INFO record of the process (the ONNX exporter's); and it logs per graph node.
    root.setLevel(level)
    root.handlers[:] = handlers
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                          accuracy_level=4, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=list(exclude),
                                     algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)


@functools.cache
def _global_thread_pool() -> int:
    """Size the process's one ONNX Runtime thread pool (once): every program of every
    engine in the process runs on it.

    Policies alternate programs call by call (target, draft, heads). With a pool per
    session, a helper program on two threads left the target's spinning pool fighting it
    for the two cores, so helpers ran on one thread: an early-exit draft call took 1.27 ms.
    On the shared pool it takes 0.86 ms and the target step is unchanged (2.15 ms), and a
    draft-4 + verify cycle went from 9.2 to 7.3 ms (bundled model, E = 4).
    """
    threads = thread_count()
    ort.set_global_thread_pool_sizes(threads, 1)
    return threads


def session_options() -> ort.SessionOptions:
    """Options for any ONNX Runtime session of a process that runs leapc programs: once the
    global pool exists, ORT refuses sessions with threads of their own."""
    _global_thread_pool()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.use_per_session_threads = False
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


# Execution providers per device, in ORT's order of preference; the CPU provider runs
# whatever a GPU provider does not take.
PROVIDERS = {
    Device.CPU: ("CPUExecutionProvider",),
    Device.CUDA: ("CUDAExecutionProvider", "CPUExecutionProvider"),
    Device.TENSORRT: ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                      "CPUExecutionProvider"),
}


def check_device(device: Device) -> None:
    """Refuse a device this onnxruntime build cannot run (the CPU-only wheel has no GPU
    providers: onnxruntime-gpu does)."""
    missing = [p for p in PROVIDERS[device] if p not in ort.get_available_providers()]
    if missing:
        raise InputError(f"--device {device.value} needs onnxruntime's {', '.join(missing)}, "
                         "which this onnxruntime lacks (pip install onnxruntime-gpu)")


class OrtStep:
    """One ONNX program (a step program, or a helper such as ``heads``) in an
    InferenceSession, called with its inputs in signature order."""

    def __init__(self, path: Path, device: Device = Device.CPU):
        options = session_options()
        ops = library_file(path)
        self.weights = None  # the engine's one copy of its weights, if this step reads it
        if ops.is_file():  # leapc's custom ops, compiled with the program (an int8 engine)
            options.register_custom_ops_library(str(ops))
            # Its GEMMs compute on the shared copy in place. ORT's own repack a constant
            # weight into a copy per session, so programs of those read the file instead.
            if device is Device.CPU:
                self.weights = shared_weights(path)
        if self.weights is not None:
            for name, value in self.weights.initializers(path.name).items():
                options.add_initializer(name, value)
        self.session = ort.InferenceSession(
            str(path), options, providers=list(PROVIDERS[device])
        )
        self.feeds = _feed_plan([i.name for i in self.session.get_inputs()])
        self.outputs = _output_plan([o.name for o in self.session.get_outputs()])
        self.output_names = tuple(name for name, _ in self.outputs)

    def __call__(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {name: inputs[i] if at is None else inputs[i][at]
                 for name, i, at in self.feeds}
        results = self.session.run(None, feeds)
        return {name: results[parts] if isinstance(parts, int) else _stack_layers(results, parts)
                for name, parts in self.outputs}


def _feed_plan(names: list[str]) -> list[tuple[str, int, tuple[int, int] | None]]:
    """Per session input: the signature input (by position) it comes from, and for one
    layer's keys or values ``<name>.<l>.<kv>`` (`onnx_kv_by_layer`) the index into it.
    Signature inputs keep their order; a split one's parts stand in its place."""
    plan, order = [], []
    for name in names:
        base, _, part = name.partition(".")
        if base not in order:
            order.append(base)
        at = tuple(int(x) for x in part.split(".")) if part else None
        plan.append((name, order.index(base), at))
    return plan


def _output_plan(names: list[str]) -> list[tuple[str, int | slice]]:
    """Per signature output, in order: the session output it is, or for one split by layer
    (``<name>.<l>.<kv>``, layer-major) the run of session outputs holding its parts."""
    plan = []
    for index, name in enumerate(names):
        base, _, part = name.partition(".")
        if not part:
            plan.append((name, index))
        elif plan and plan[-1][0] == base:
            plan[-1] = (base, slice(plan[-1][1].start, index + 1))
        else:
            plan.append((base, slice(index, index + 1)))
    return plan


def _stack_layers(results: list[np.ndarray], parts: slice) -> np.ndarray:
    """``[L, 2, ...]`` from the ``2 L`` per-layer keys and values: joined along their
    leading (batch) axis, which lays them out as stacking would (`np.stack` spent ~12 µs a
    step on its per-array checks, ~2% of an int8 one-token step)."""
    rows = results[parts]
    return np.concatenate(rows).reshape(len(rows) // 2, 2, *rows[0].shape)


def compress(file: Path, program, compression: Compression) -> None:
    """leapc's int8 ``Q8MatMul`` for every program of a ``--quantize int8`` engine, its
    ``BF16MatMul`` for every program of a ``--quantize bf16`` one; weight-only
    `MatMulNBits`: int8 for a draft-only program and every program of an ``int8-nbits``
    engine, int4 for every program of an ``int4`` one, int8 for an early-exit draft's
    vocabulary projection only."""
    if compression is Compression.INT8:
        use_leapc_kernels(file, WeightFormat.Q8)
    elif compression is Compression.BF16:
        use_leapc_kernels(file, WeightFormat.BF16)
    elif compression in (Compression.DRAFT, Compression.INT8_NBITS):
        quantize_weights(file)
    elif compression is Compression.INT4:
        quantize_weights(file, bits=4)
    elif compression is Compression.VOCAB_PROJECTION:
        from leapc.passes.restrict_draft_vocabulary import projected_tokens  # build-time

        quantize_vocab_projection(file, projected_tokens(program))


BACKEND = BackendImpl(
    # CPU, or the CUDA / TensorRT execution providers; tree attention
    name=Backend.ORT, default_attention=Attention.TREE, lower=lower,
    load=lambda path, outputs, device: OrtStep(path, device=device),
    check_device=check_device, compress=compress, share_weights=share_weights,
    compresses=frozenset({Compression.DRAFT, Compression.VOCAB_PROJECTION, Compression.INT8,
                          Compression.INT8_NBITS, Compression.INT4, Compression.BF16}),
    attentions=frozenset(Attention))
