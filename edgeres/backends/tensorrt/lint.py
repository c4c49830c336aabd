"""What TensorRT rejects or runs slowly in an ONNX graph: the rules `edgeres check` adds for TensorRT targets
(`TensorRTBackend.lint_rules`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from edgeres.check import Finding
from edgeres.onnxgraph import (
    QDQ,
    GraphView,
    attr,
)
from edgeres.targets import Target, parse_version

if TYPE_CHECKING:
    import onnx



# Ops TensorRT runs in INT8 (or fuses into an INT8 neighbour) when they sit between Q/DQ.
_INT8_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Relu", "Clip", "LeakyRelu", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "Concat", "Flatten", "Reshape", "Transpose", "Squeeze",
    "Unsqueeze", "Identity", "Pad", "Slice", "QuantizeLinear", "DequantizeLinear",
}


# Ops the ONNX parser first accepted in TensorRT 8.5 (onnx-tensorrt CHANGELOG, "TensorRT 8.5 GA Release").
_OPS_SINCE_8_5 = {
    "RandomNormal", "RandomUniform", "MeanVarianceNormalization", "RoiAlign", "Mod", "Trilu", "GridSample",
    "NonZero",
}


def _output_channel_axis(consumer: onnx.NodeProto, rank: int) -> int:
    if consumer.op_type == "MatMul":
        return rank - 1
    if consumer.op_type == "Gemm":
        return 0 if attr(consumer, "transB", 0) else 1
    if consumer.op_type == "ConvTranspose":
        return 1
    return 0


def _qdq_types(g: GraphView, target: Target) -> Iterator[Finding]:
    for node in g.of_type(*QDQ):
        zp = g.const(node, 2)
        if zp is not None:
            unsigned = zp.dtype == np.uint8
        elif len(node.input) > 2 and node.input[2]:
            continue   # a zero point computed at run time: its type cannot be read here
        elif node.op_type == "QuantizeLinear":
            # No zero point: uint8 unless opset 21's output_dtype says otherwise (ONNX spec).
            unsigned = attr(node, "output_dtype", 0) in (0, 2)  # 2 = TensorProto.UINT8
        else:
            x = g.const(node, 0)
            unsigned = x is not None and x.dtype == np.uint8
        if unsigned:
            yield Finding("error", "uint8-qdq", g.name(node),
                          f"{node.op_type} uses uint8; TensorRT only runs int8 Q/DQ (signed, zero point 0): "
                          "export the tensorrt Q/DQ flavour")
        if zp is not None and np.any(zp != 0):
            yield Finding("error", "nonzero-zero-point", g.name(node),
                          f"zero point {zp.ravel()[:4].tolist()} is not 0; TensorRT quantizes symmetrically")


def _residual_qdq(g: GraphView, target: Target) -> Iterator[Finding]:
    for add in g.of_type("Add"):
        branches = [name for name in add.input if name and name not in g.consts]
        if len(branches) != 2:
            continue
        conv_inputs = []
        for name in branches:
            inner = g.behind_qdq(name)
            src = g.source(inner if inner is not None else name)
            if src is not None and src.op_type == "Conv":
                conv_inputs.append((name, inner is not None))
        if conv_inputs and all(quantized for _, quantized in conv_inputs):
            yield Finding("warning", "residual-qdq", g.name(add),
                          "Q/DQ sits on the conv branch of this residual Add, so Conv + Add cannot fuse; "
                          "quantize the identity input instead")


def _fp32_between_qdq(g: GraphView, target: Target) -> Iterator[Finding]:
    if not g.has_qdq():
        return
    for node in g.nodes:
        if node.op_type == "BatchNormalization":
            yield Finding("warning", "fp32-between-qdq", g.name(node),
                          "BatchNormalization is not folded and runs in FP32 between Q/DQ; fold BN before "
                          "quantizing")
            continue
        if node.op_type in _INT8_OPS:
            continue
        fed = any(g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear"
                  for i in node.input if i)
        feeds = [c for o in node.output for c in g.consumers.get(o, [])]
        if fed and feeds and all(c.op_type == "QuantizeLinear" for c in feeds):
            yield Finding("warning", "fp32-between-qdq", g.name(node),
                          f"{node.op_type} has no INT8 kernel and runs in FP32 between Q/DQ")


def _unsupported_ops(g: GraphView, target: Target) -> Iterator[Finding]:
    trt = target.tensorrt
    if trt is None or parse_version(trt.min)[:2] >= (8, 5):
        return
    too_old = parse_version(trt.max)[:2] < (8, 5)
    for node in g.of_type(*_OPS_SINCE_8_5):
        if too_old:
            yield Finding("error", "unsupported-op", g.name(node),
                          f"{node.op_type} needs TensorRT >= 8.5; {target.name} runs at most {trt.max}")
        else:
            yield Finding("warning", "unsupported-op", g.name(node),
                          f"{node.op_type} needs TensorRT >= 8.5; builds on {target.name} with TensorRT "
                          f"{trt.min} fail")


def _per_channel_axes(g: GraphView, target: Target) -> Iterator[Finding]:
    for dq in g.of_type("DequantizeLinear"):
        scale = g.const(dq, 1)
        if scale is None or scale.size <= 1:
            continue
        if not g.is_weight(dq):
            yield Finding("error", "per-channel-activation", g.name(dq),
                          f"activation {dq.input[0]!r} is quantized per channel ({scale.size} scales); "
                          "TensorRT needs per-tensor activation scales")
            continue
        weight = g.consts.get(dq.input[0])
        if weight is None:
            weight = g.consts[g.producer[dq.input[0]].input[0]]
        axis = attr(dq, "axis", 1)
        axis = axis + weight.ndim if axis < 0 else axis
        users = g.consumers.get(dq.output[0], [])
        expected = _output_channel_axis(users[0], weight.ndim) if users else 0
        if axis != expected:
            yield Finding("error", "per-channel-axis", g.name(dq),
                          f"weight {weight.shape} is quantized per channel on axis {axis}; "
                          f"TensorRT needs the output-channel axis {expected}")


TENSORRT_RULES = (_per_channel_axes, _qdq_types, _residual_qdq, _fp32_between_qdq, _unsupported_ops)
