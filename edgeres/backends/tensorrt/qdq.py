"""TensorRT's Q/DQ side: its Q/DQ dialect (`to_tensorrt_flavour`), the Q/DQ-free ONNX and the calibration
cache (implicit INT8 for the DLA) made from the quantized model's scales."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeres.backends.tensorrt.plan import trt_version_int
from edgeres.errors import ExportError
from edgeres.io import atomic_write
from edgeres.onnxgraph import (
    Graph,
    GraphView,
    attr,
    is_weight_dq,
    short_tensor_names,
    store_int8_weights,
    zero_point,
)

if TYPE_CHECKING:
    import onnx



# Ops that keep the quantization scale of their input (the Q/DQ-Translator's
# DEFAULT_OPS_TO_INFER_ADJACENT_SCALES, NVIDIA/Deep-Learning-Accelerator-SW tools/qdq-translator,
# without Sigmoid, whose output range differs from its input's).
_SCALE_KEEPING_OPS = {"MaxPool", "Flatten", "Relu", "Pad", "Transpose", "Reshape", "Squeeze", "Unsqueeze"}


def calibration_cache_header(trt_version: str | tuple[int, ...]) -> str:
    return f"TRT-{trt_version_int(trt_version)}-EntropyCalibration2"


def scale_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def calibration_cache_text(scales: dict[str, float], trt_version: str | tuple[int, ...]) -> str:
    lines = [calibration_cache_header(trt_version)]
    for name, scale in scales.items():
        if not (math.isfinite(scale) and scale > 0):
            raise ExportError(f"calibration scale of {name!r} is {scale}; it must be a positive number")
        if ": " in name or "\n" in name:
            raise ExportError(f"tensor name {name!r} cannot be written to a calibration cache")
        lines.append(f"{name}: {scale_hex(scale)}")
    return "\n".join(lines) + "\n"


def write_calibration_cache(path: str | os.PathLike, scales: dict[str, float],
                            trt_version: str | tuple[int, ...]) -> Path:
    """Write `scales` (tensor name -> amax/127) as a TensorRT calibration cache for `trt_version`."""
    path = Path(path)
    text = calibration_cache_text(scales, trt_version)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="ascii")
    return path


def read_calibration_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """(header, scales) of a TensorRT calibration cache."""
    lines = Path(path).read_text(encoding="ascii").splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise ExportError(f"{path} is not a TensorRT calibration cache (no TRT- header)")
    scales = {}
    for line in lines[1:]:
        name, _, value = line.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return lines[0], scales


def retarget_calibration_cache(text: str, trt_version: str | tuple[int, ...]) -> str:
    """The same cache with the header of `trt_version`."""
    body = text.split("\n", 1)[1] if "\n" in text else ""
    return calibration_cache_header(trt_version) + "\n" + body


def _axis_shape(scale: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if scale.size <= 1:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = scale.size
    return scale.reshape(shape)


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)   # ONNX: no zero point means uint8
    info = np.iinfo(dtype)
    s = _axis_shape(scale.astype(np.float32), x.ndim, axis)
    z = _axis_shape(zp.astype(np.int32), x.ndim, axis) if zp is not None else 0
    return np.clip(np.rint(x / s) + z, info.min, info.max).astype(dtype)


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    s = _axis_shape(scale.astype(np.float32), q.ndim, axis)
    z = _axis_shape(zp.astype(np.int32), q.ndim, axis) if zp is not None else 0
    return ((q.astype(np.int32) - z) * s).astype(np.float32)


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _drop_dead_nodes(nodes: list, outputs: set[str]) -> list:
    """Nodes whose outputs something still reads (constants and scale Identities left behind)."""
    kept: list = []
    needed = set(outputs)
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    return kept[::-1]


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove activation Q/DQ pairs and fold weight Q/DQ into float initializers (quantized values)."""
    import onnx as onnx_mod
    from onnx import helper, numpy_helper

    from edgeres.onnxgraph import load

    out = onnx_mod.ModelProto()
    out.CopyFrom(load(model))
    g = GraphView(out)
    drop: set[int] = set()
    rename: dict[str, str] = {}
    folded = []
    for dq in g.of_type("DequantizeLinear"):
        q = g.producer.get(dq.input[0])
        q = q if q is not None and q.op_type == "QuantizeLinear" else None
        axis, scale, zp = _axis(dq), g.const(dq, 1), g.const(dq, 2)
        if scale is None:
            raise ExportError(f"DequantizeLinear {g.name(dq)} has a non-constant scale; export it again")
        if g.is_weight(dq):
            if q is None:
                stored = g.consts[dq.input[0]]
            else:
                qs = g.const(q, 1)
                stored = _quantize(g.consts[q.input[0]], qs, g.const(q, 2), _axis(q))
            folded.append(numpy_helper.from_array(_dequantize(stored, scale, zp, axis), dq.output[0]))
        elif q is not None:
            rename[dq.output[0]] = q.input[0]
        else:
            raise ExportError(f"DequantizeLinear {g.name(dq)} reads a quantized activation with no "
                              "QuantizeLinear before it; the model cannot be made Q/DQ-free")
        drop.add(id(dq))
        if q is not None and all(c.op_type == "DequantizeLinear" for c in g.consumers[q.output[0]]):
            drop.add(id(q))

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    nodes = [n for n in out.graph.node if id(n) not in drop]
    for n in nodes:
        for i, name in enumerate(n.input):
            n.input[i] = resolve(name)
    for o in out.graph.output:
        if o.name in rename:
            nodes.append(helper.make_node("Identity", [resolve(o.name)], [o.name], f"{o.name}_identity"))
    nodes = _drop_dead_nodes(nodes, {o.name for o in out.graph.output})
    used = {name for n in nodes for name in n.input} | {o.name for o in out.graph.output}
    kept_inits = [i for i in out.graph.initializer if i.name in used]
    produced = {o for n in nodes for o in n.output} | {i.name for i in out.graph.input}
    kept_info = [vi for vi in out.graph.value_info if vi.name in produced]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits + folded)
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    return out


def scales_from_qdq_onnx(model: onnx.ModelProto | str | os.PathLike) -> dict[str, float]:
    """Per-tensor activation scales (amax/127) keyed by tensor names of the `strip_qdq` graph.

    Each QuantizeLinear on an activation gives its input tensor a scale; scales then spread through
    ops that keep the range (Relu, MaxPool, Reshape, ...), as NVIDIA's Q/DQ-Translator does.
    """
    from edgeres.onnxgraph import load

    model = load(model)
    g = GraphView(model)
    scales: dict[str, float] = {}
    for q in g.of_type("QuantizeLinear"):
        x = q.input[0]
        if x in g.consts:
            continue
        scale, zp = g.const(q, 1), g.const(q, 2)
        if scale is None or scale.size != 1:
            raise ExportError(f"QuantizeLinear {g.name(q)} is not per-tensor with a constant scale; "
                              "a calibration cache needs one scale per activation")
        if zp is not None and np.any(zp != 0):
            raise ExportError(f"QuantizeLinear {g.name(q)} has a non-zero zero point; TensorRT is symmetric")
        s = float(scale.reshape(()))
        if zp is None or zp.dtype == np.uint8:
            s = s * 255.0 / 127.0   # uint8 covers [0, 255*s]: the same amax over 127 levels
        scales[x] = max(scales.get(x, 0.0), s)
    stripped = GraphView(strip_qdq(model))
    changed = True
    while changed:
        changed = False
        for node in stripped.nodes:
            if node.op_type not in _SCALE_KEEPING_OPS or not node.input or not node.output:
                continue
            src, dst = node.input[0], node.output[0]
            if src in scales and dst not in scales:
                scales[dst], changed = scales[src], True
            elif dst in scales and src not in scales and src not in stripped.consts:
                scales[src], changed = scales[dst], True
    return scales


_GRID_PRESERVING = {"MaxPool", "GlobalMaxPool", "Slice", "Pad", "Reshape", "Flatten", "Transpose", "Squeeze",
                    "Unsqueeze", "Identity"}


def _trace_to_dq(gr: Graph, name: str):
    """The DequantizeLinear a tensor comes from through grid-preserving ops (slice, pad, reshape...)."""
    while True:
        node = gr.producer.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            return node
        if node.op_type not in _GRID_PRESERVING:
            return None
        if node.op_type == "Pad" and (attr(node, "mode", b"constant") not in (b"constant", "constant")
                                      or (len(node.input) > 2 and node.input[2]
                                          and np.any(gr.const(node.input[2]) != 0))):
            return None
        name = node.input[0]


def _conv_branch(gr: Graph, add, i: int):
    """(Q, DQ) between a Conv and input `i` of `add`, when each tensor on that path has one reader."""
    dq = gr.producer.get(add.input[i])
    if dq is None or dq.op_type != "DequantizeLinear" or len(gr.consumers[dq.output[0]]) != 1:
        return None
    q = gr.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or len(gr.consumers[q.output[0]]) != 1:
        return None
    conv = gr.producer.get(q.input[0])
    if conv is None or conv.op_type != "Conv" or len(gr.consumers[q.input[0]]) != 1:
        return None
    return q, dq


def _move_add_qdq_to_identity(gr: Graph) -> int:
    """NVIDIA's residual rule: drop Q/DQ on the conv branch of an Add, keep/insert it on the identity."""
    import onnx

    moved = 0
    for add in [n for n in gr.g.node if n.op_type == "Add" and len(n.input) == 2]:
        for branch in (0, 1):  # prefer input 0: blocks compute `out + identity`
            pair = _conv_branch(gr, add, branch)
            src = _trace_to_dq(gr, add.input[1 - branch]) if pair else None
            if pair is None or src is None:
                continue
            q, dq = pair
            add.input[branch] = q.input[0]
            gr.g.node.remove(q)
            gr.g.node.remove(dq)
            ident = add.input[1 - branch]
            if gr.producer[ident] is not src:  # identity reaches the Add through slice/pad: re-quantize there
                qo, do = gr.unique(f"{ident}_residual_q"), gr.unique(f"{ident}_residual_dq")
                args = [ident, src.input[1]] + ([src.input[2]] if len(src.input) > 2 else [])
                gr.insert_before(add, onnx.helper.make_node("QuantizeLinear", args, [qo], name=qo))
                gr.insert_before(add, onnx.helper.make_node("DequantizeLinear", [qo, *args[1:]], [do], name=do))
                add.input[1 - branch] = do
            moved += 1
            gr.refresh()
            break
    gr.prune_unused()
    return moved


def to_tensorrt_flavour(onnx_model):
    """Q/DQ layout for TensorRT explicit quantization: int8 only, zp 0, per-channel weights on axis 0."""
    model = store_int8_weights(onnx_model)
    gr = Graph(model)
    for node in gr.g.node:
        if node.domain not in ("", "ai.onnx"):
            raise ExportError(f"op {node.domain}::{node.op_type} is not standard ONNX; export a stripped model")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = zero_point(gr, node)
        if zp.dtype != np.int8 or np.any(zp != 0):
            raise ExportError(
                f"{node.op_type} {node.name!r} is {zp.dtype} with zero point {zp.max()}; TensorRT needs int8 "
                "zero point 0: quantize with signed activations (QuantizeOptions(signed_activations=True))"
            )
        if is_weight_dq(gr, node) and gr.const(node.input[1]).size > 1 and attr(node, "axis", 1) != 0:
            raise ExportError(f"per-channel weight scales of {node.name!r} are not on axis 0")
    _move_add_qdq_to_identity(gr)
    return short_tensor_names(model)
