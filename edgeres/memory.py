"""Inference memory of an ONNX graph: weights at a precision, plus the peak of live activations.

The activation figure is a liveness pass over the exported graph with shapes inferred at batch B:
nodes run in the graph's (topological) order; every intermediate tensor occupies a buffer from the
node that writes it until its last reader (graph outputs until the end). Like ONNX Runtime's
allocation planner, the pass lets
- shape-only ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity) alias their input (no buffer),
- element-wise ops (Relu, Add, Mul, ...) write into an input buffer of the same size that dies at
  that node (in place), never into the caller's input,
- a Conv whose only reader is a residual Add writes into the Add's other input (ORT's NCHWc Conv
  with Sum at ORT_ENABLE_ALL, TensorRT's conv+add fusion); `fuse_conv_add=False` drops this rule.
The peak is the largest sum of live buffers at any node, counting that node's inputs and outputs.
Checked against ONNX Runtime's measured peak (`measure_peak`, FP32, batch 64/128, WRN-10-1/2/4):
within 1 %, at ORT_ENABLE_ALL with the fusion rule (and, when first measured, at ORT_ENABLE_BASIC without it).

Bytes per element follow the precision the target runs (`activation_bytes`):
- fp32: 4 bytes everywhere.
- fp16: 2 bytes for intermediates; the graph input and output stay fp32 (engine I/O bindings).
- int8: 1 byte for tensors read only by quantized layers (Conv, Gemm, MatMul: their inputs carry
  Q/DQ in the exported INT8 graph); everything else (conv outputs before BN/ReLU/Add, BN and
  residual-add outputs, the graph input and logits) 4 bytes, i.e. no layer fusion is assumed. Fused
  engines (TensorRT conv+add+ReLU) keep fewer tensors, so for them the figure is an upper bound.

Weights: every parameter at the precision (BN counted as its folded scale and shift); int8 stores
conv and linear weights in 1 byte plus one fp32 scale per output channel, and keeps biases and BN
parameters in fp32. Not counted: the runtime's own workspace (im2col and kernel scratch buffers),
the engine/session overhead (code, CUDA context, allocator slack) and the memory of the process.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from edgeres.errors import EdgeresError
from edgeres.peakmem import PeakMemory, can_measure

if TYPE_CHECKING:
    from torch import nn

    from edgeres.backends.base import Artifact

PRECISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
ALIAS_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
INPLACE_OPS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Add", "Sub", "Mul", "Div", "Sum", "Neg", "Abs",
               "HardSigmoid", "Dropout"}
QUANTIZED_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


@dataclass(frozen=True)
class ActivationMemory:
    """Result of the liveness pass at one batch size (bytes)."""

    batch: int
    precision: str
    peak_bytes: int  # largest sum of live activation buffers, graph input included
    peak_node: str  # "op_type name" of the node where the peak occurs
    input_bytes: int  # the graph input (the caller's buffer)
    output_bytes: int
    traffic_bytes: int  # activation bytes every node reads and writes (for a bandwidth roofline)
    buffers: int  # distinct buffers after aliasing and in-place reuse
    runtime_peak_bytes: int  # the peak of what the runtime allocates itself (the caller's input left out)

    def to_dict(self) -> dict:
        return asdict(self)


def _elem_size(elem_type: int) -> int:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def with_batch(onnx_model, batch: int):
    """A copy with the batch dimension of the inputs and outputs fixed, and every shape inferred."""
    import onnx

    if batch < 1:
        raise EdgeresError(f"batch must be >= 1, got {batch}")
    model = copy.deepcopy(onnx_model)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].Clear()
            dims[0].dim_value = batch
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def _shapes(model) -> dict[str, tuple[tuple[int, ...], int]]:
    out = {}
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        out[v.name] = (dims, t.elem_type)
    return out


def _bytes_per_element(name: str, elem_type: int, precision: str, io: set[str], consumers: dict) -> int:
    native = _elem_size(elem_type)
    if precision == "fp32" or name in io or native != 4:
        return native  # integer shape tensors keep their type
    if precision == "fp16":
        return 2
    readers = consumers.get(name, [])
    return 1 if readers and all(op in QUANTIZED_OPS for op in readers) else 4


def _conv_add_pairs(nodes, consts: set[str], readers: dict[str, int]) -> dict[int, tuple[int, str]]:
    """{conv index: (add index, other input)} where a Conv's only reader is an Add whose other input exists
    already: the fused kernel (ORT's Conv with Sum, TensorRT's conv+add) accumulates into that input."""
    produced_at = {o: i for i, n in enumerate(nodes) for o in n.output}
    pairs: dict[int, tuple[int, str]] = {}
    for j, add in enumerate(nodes):
        ins = [x for x in add.input if x and x not in consts]
        if add.op_type != "Add" or len(ins) != 2:
            continue
        options = []
        for k in (0, 1):
            c = produced_at.get(ins[k])
            if c is None or nodes[c].op_type != "Conv" or readers.get(ins[k]) != 1:
                continue
            if produced_at.get(ins[1 - k], -1) < c:  # the other input is ready before the conv runs
                options.append((c, ins[1 - k]))
        if options:
            c, other = max(options)
            pairs[c] = (j, other)
    return pairs


def activation_memory(onnx_model, *, batch: int, precision: str = "fp32", fuse_conv_add: bool = True
                      ) -> ActivationMemory:
    """Peak live activation bytes of `onnx_model` at `batch`, under the rules in the module docstring.

    `fuse_conv_add` models a Conv whose only reader is a residual Add writing into the Add's other
    input (ONNX Runtime's NCHWc Conv+Sum at ORT_ENABLE_ALL, TensorRT's conv+add fusion); without it the
    pass matches ONNX Runtime at ORT_ENABLE_BASIC.
    """
    if precision not in PRECISION_BYTES:
        raise EdgeresError(f"precision must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
    model = with_batch(onnx_model, batch)
    g = model.graph
    shapes = _shapes(model)
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    inputs = [i.name for i in g.input if i.name not in consts]
    outputs = {o.name for o in g.output}
    io = set(inputs) | outputs
    nodes = [n for n in g.node if n.op_type != "Constant"]
    consumers: dict[str, list[str]] = {}
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            if name and name not in consts:
                consumers.setdefault(name, []).append(n.op_type)
                last_use[name] = i
    end = len(nodes)
    for name in outputs:
        last_use[name] = end

    def size(name: str) -> int:
        if name not in shapes:
            raise EdgeresError(f"no inferred shape for tensor {name!r}; re-export the model with a static input size")
        dims, elem = shapes[name]
        if any(d < 0 for d in dims):
            raise EdgeresError(f"tensor {name!r} has an unknown dimension {dims}; fix the input size and batch")
        count = 1
        for d in dims:
            count *= d
        return count * _bytes_per_element(name, elem, precision, io, consumers)

    readers = {name: len(ops) for name, ops in consumers.items()}
    fused = _conv_add_pairs(nodes, consts, readers) if fuse_conv_add else {}
    buffers: list[list] = []  # [bytes, birth step, death step, caller-owned]
    owner: dict[str, int] = {}
    for name in inputs:
        owner[name] = len(buffers)
        buffers.append([size(name), -1, last_use.get(name, -1), True])

    def dies_here(name: str, step: int, nbytes: int) -> bool:
        b = buffers[owner[name]]
        return not b[3] and b[2] == step and b[0] == nbytes

    traffic = 0
    for i, n in enumerate(nodes):
        ins = [x for x in n.input if x and x not in consts]
        alias = n.op_type in ALIAS_OPS and bool(ins)
        if not alias:
            traffic += sum(size(x) for x in ins) + sum(size(o) for o in n.output if o)
        for out in [o for o in n.output if o]:
            nbytes, death = size(out), last_use.get(out, i)
            target = None
            if alias:
                target = owner[ins[0]]
            elif i in fused and dies_here(fused[i][1], fused[i][0], nbytes):
                target = owner[fused[i][1]]
            elif n.op_type in INPLACE_OPS:
                target = next((owner[x] for x in ins if dies_here(x, i, nbytes)), None)
            if target is None:
                owner[out] = len(buffers)
                buffers.append([nbytes, i, death, False])
            else:
                owner[out] = target
                buffers[target][2] = max(buffers[target][2], death)

    def peak(count_input: bool) -> tuple[int, int]:
        best, at = 0, -1
        for step in range(-1, end + 1):
            live = sum(b[0] for b in buffers if b[1] <= step <= b[2] and (count_input or not b[3]))
            if live > best:
                best, at = live, step
        return best, at

    total, at = peak(True)
    runtime_only, _ = peak(False)
    where = nodes[at] if 0 <= at < end else None
    return ActivationMemory(
        batch=batch,
        precision=precision,
        peak_bytes=total,
        peak_node=f"{where.op_type} {where.name}" if where is not None else "graph input",
        input_bytes=sum(size(x) for x in inputs),
        output_bytes=sum(size(x) for x in outputs),
        traffic_bytes=traffic,
        buffers=len(buffers),
        runtime_peak_bytes=runtime_only,
    )


def weight_bytes(model: nn.Module, precision: str) -> int:
    """Parameter bytes at `precision` (see the module docstring for the int8 rule)."""
    from torch import nn

    if precision not in PRECISION_BYTES:
        raise EdgeresError(f"precision must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
    if precision != "int8":
        return sum(p.numel() for p in model.parameters()) * PRECISION_BYTES[precision]
    total = 0
    quantized = set()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            total += m.weight.numel() + 4 * m.weight.shape[0]  # int8 values + one fp32 scale per output channel
            quantized.add(id(m.weight))
    total += 4 * sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    return total



# ---------------------------------------------------------------- a runtime's measured peak

MMAP_THRESHOLD = 64 * 1024  # glibc M_MMAP_THRESHOLD: buffers above it are mapped and unmapped one by one
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _in_fresh_process(artifact: Artifact, batch: int, input_shape: tuple[int, ...], threads: int) -> PeakMemory:
    import ctypes

    from edgeres.backends.base import RuntimeOptions, get_backend

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt") or libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        raise EdgeresError("cannot fix the allocator's mmap threshold (glibc mallopt); peak memory not measured")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # this process is ours: set before the runtime loads
    return get_backend(artifact.runtime).peak_memory(artifact, batch=batch, input_shape=input_shape,
                                                     options=RuntimeOptions(threads=threads))


def measure_peak(artifact: Artifact, *, batch: int, input_shape: Sequence[int], threads: int = 1,
                 timeout: float = 600) -> PeakMemory:
    """The artifact's peak memory for one inference at `batch`, measured by its backend (`peak_memory`).

    In a fresh spawned process, like latency, so the figure does not depend on what this process did before, and
    with glibc's mmap threshold fixed at 64 KiB: every large buffer is then mapped when allocated and returned when
    freed (the default threshold grows after frees and would serve later buffers from a heap that is not trimmed).
    """
    if batch < 1:
        raise EdgeresError(f"batch must be >= 1, got {batch}")
    if not can_measure():
        raise EdgeresError("peak memory is measured on Linux only (/proc/self/clear_refs resets the peak)")
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # leaving the block terminates the worker
        job = pool.apply_async(_in_fresh_process, (artifact, batch, tuple(int(v) for v in input_shape), threads))
        try:
            return job.get(timeout)
        except multiprocessing.TimeoutError:
            raise EdgeresError(f"measuring the peak memory of {artifact.path} took over {timeout:.0f} s") from None
