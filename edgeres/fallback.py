"""Mixed precision in the ONNX: quantized layers, and some of them kept out of INT8.

A layer here is a Conv or Gemm whose weight comes through a DequantizeLinear (what NNCF quantized).
`quantized_layers` lists them with the names a user can act on: the PyTorch module (from the weight
initializer, `layer2.0.conv1`) and the ONNX node (`/layer2/layer2.0/conv1/Conv`), and their MACs.

`keep_float` works on the raw Q/DQ export, before any runtime flavour: the layer reads its FP32 weight
and its FP32 input directly (its Q/DQ is simply absent), so every flavour built from that graph runs
it in float. `type_fp16` then works on the TensorRT flavour: strongly typed TensorRT (10.12 on, 11)
runs a layer without Q/DQ in its tensors' type, so the layer gets FP16 weights and Casts around it;
weakly typed builds (up to 10.11) get `--int8 --fp16`, which leaves TensorRT free to pick FP16 too.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from edgeres.errors import ExportError
from edgeres.onnxgraph import Graph as _Graph
from edgeres.onnxgraph import clear_value_info as _clear_value_info
from edgeres.onnxgraph import drop_dead_nodes as _drop_dead_nodes
from edgeres.onnxgraph import tensor_shapes as _tensor_shapes

LAYER_OPS = ("Conv", "Gemm")
# Pure data movement: a layer that alone reads it (Flatten before the classifier) owns its input through it.
DATA_MOVEMENT = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad"}


@dataclass(frozen=True)
class Layer:
    """One quantized layer: its PyTorch module name, ONNX node name, op and MACs per image."""

    module: str
    node: str
    op: str
    macs: int

    def to_dict(self) -> dict:
        return asdict(self)


def _weight_source(gr: _Graph, node) -> str | None:
    """The FP32 initializer behind a layer's weight Q/DQ (raw export), or the int8 one (flavoured)."""
    dq = gr.producer.get(node.input[1]) if len(node.input) > 1 else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    if dq.input[0] in gr.inits:
        return dq.input[0]
    q = gr.producer.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in gr.inits:
        return q.input[0]
    return None


def module_name(weight: str) -> str:
    """`layer1.0.conv1.weight_quantized` -> `layer1.0.conv1`: the PyTorch module a weight initializer belongs to."""
    for suffix in ("_fp16", "_amx", "_quantized", ".weight"):
        weight = weight.removesuffix(suffix)
    return weight


def layer_macs(onnx_model) -> dict[str, int]:
    """MACs per image of every Conv and Gemm node, by node name (output shapes from ONNX shape inference)."""
    gr = _Graph(onnx_model)
    layers = [n for n in gr.g.node if n.op_type in LAYER_OPS]
    shapes = _tensor_shapes(onnx_model, [n.output[0] for n in layers]) if layers else {}
    out = {}
    for n in layers:
        w = _weight_array_shape(gr, n.input[1])
        if w is None:
            raise ExportError(f"cannot find the weight of {n.op_type} {n.name!r}")
        y = shapes.get(n.output[0], ())
        if n.op_type == "Conv" and (len(y) < 2 or None in y[1:]):
            raise ExportError(f"cannot infer the output shape of {n.name!r} ({y or 'none'}); "
                              "re-export the model with a fixed input size")
        out[n.name] = int(np.prod(y[1:])) * int(np.prod(w[1:])) if n.op_type == "Conv" else int(w[0]) * int(w[1])
    return out


def node_module(node_name: str) -> str:
    """`/layer1/layer1.0/conv1/Conv` -> `layer1.0.conv1`: the module scope the TorchScript exporter names nodes by."""
    parts = [p for p in node_name.split("/") if p][:-1]
    name = ""
    for part in parts:
        name = part if not name or part.startswith(name + ".") else f"{name}.{part}"
    return name or node_name


def _layer_module(gr: _Graph, node, weight: str | None) -> str:
    if weight is not None and not weight.startswith("onnx::"):
        return module_name(weight)
    return node_module(node.name)  # the exporter renamed a folded weight (onnx::Conv_274): the scope names it


def _weight_array_shape(gr: _Graph, name: str) -> tuple[int, ...] | None:
    while name not in gr.inits:
        node = gr.producer.get(name)
        if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity"):
            return None
        name = node.input[0]
    return tuple(gr.inits[name].dims)


def quantized_layers(onnx_model) -> list[Layer]:
    """Every Conv/Gemm that reads a quantized weight, in graph order."""
    gr = _Graph(onnx_model)
    macs = layer_macs(onnx_model)
    layers = []
    for n in gr.g.node:
        if n.op_type in LAYER_OPS and (w := _weight_source(gr, n)) is not None:
            layers.append(Layer(module=_layer_module(gr, n, w), node=n.name, op=n.op_type, macs=macs[n.name]))
    return layers


def all_layers(onnx_model) -> list[Layer]:
    """Every Conv/Gemm, quantized or not (the module name from the weight initializer)."""
    gr = _Graph(onnx_model)
    macs = layer_macs(onnx_model)
    out = []
    for n in gr.g.node:
        if n.op_type not in LAYER_OPS:
            continue
        w = _weight_source(gr, n) or (n.input[1] if n.input[1] in gr.inits else None)
        out.append(Layer(module=_layer_module(gr, n, w), node=n.name, op=n.op_type, macs=macs[n.name]))
    return out


def _float_input(gr: _Graph, node) -> None:
    """Point `node`'s data input past its activation DequantizeLinear (through data movement it alone reads)."""
    name = node.input[0]
    reader, slot = node, 0
    while True:
        src = gr.producer.get(name)
        if src is None:
            return
        if src.op_type == "DequantizeLinear":
            q = gr.producer.get(src.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                return
            reader.input[slot] = q.input[0]
            return
        if src.op_type not in DATA_MOVEMENT or len(gr.consumers[src.output[0]]) != 1:
            return
        # data movement only this layer reads (Flatten before the classifier): give it its own float input
        reader, slot, name = src, 0, src.input[0]


def keep_float(onnx_model, nodes: Iterable[str]):
    """A copy of the raw Q/DQ export with the named layers' Q/DQ removed: they run in FP32."""
    model = copy.deepcopy(onnx_model)
    gr = _Graph(model)
    wanted = set(nodes)
    by_name = {n.name: n for n in gr.g.node if n.op_type in LAYER_OPS}
    missing = sorted(wanted - set(by_name))
    if missing:
        raise ExportError(f"no layer named {missing[0]!r} in the ONNX; see `edgeres sensitivity` for the names")
    for name in wanted:
        node = by_name[name]
        dq = gr.producer.get(node.input[1])
        q = gr.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in gr.inits:
            raise ExportError(f"layer {name!r} has no weight Q/DQ to remove; pass the raw Q/DQ export")
        node.input[1] = q.input[0]
        _float_input(gr, node)
        gr.refresh()
    _drop_dead_nodes(gr)
    gr.prune_unused()
    return model


def type_fp16(onnx_model, nodes: Iterable[str]):
    """A copy where the named float layers run in FP16: FP16 weights and bias, a Cast on each side."""
    import onnx
    from onnx import TensorProto

    model = copy.deepcopy(onnx_model)
    gr = _Graph(model)
    by_name = {n.name: n for n in gr.g.node if n.op_type in LAYER_OPS}
    for name in nodes:
        node = by_name.get(name)
        if node is None:
            raise ExportError(f"no layer named {name!r} in the ONNX")
        for i in (1, 2):
            if len(node.input) <= i or not node.input[i]:
                continue
            value = gr.const(node.input[i])
            if value is None or value.dtype != np.float32:
                raise ExportError(f"layer {name!r} does not read an FP32 constant weight; keep it float first")
            half = value.astype(np.float16)  # a copy of its own: the exporter shares equal constants
            node.input[i] = gr.add_init(f"{node.input[i]}_fp16", half)
        x16 = gr.unique(f"{node.input[0]}_fp16")
        gr.insert_before(node, onnx.helper.make_node("Cast", [node.input[0]], [x16], to=TensorProto.FLOAT16,
                                                     name=gr.unique(f"{name}_in_fp16")))
        node.input[0] = x16
        out = node.output[0]
        y16 = gr.unique(f"{out}_fp16")
        node.output[0] = y16
        cast = onnx.helper.make_node("Cast", [y16], [out], to=TensorProto.FLOAT, name=gr.unique(f"{name}_out_fp32"))
        gr.g.node.insert(list(gr.g.node).index(node) + 1, cast)
        _clear_value_info(model, {out, y16, x16})
        gr.refresh()
    gr.prune_unused()
    return model
