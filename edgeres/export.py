"""torch -> ONNX, and the two Q/DQ graph flavours the runtimes want; nothing runtime-specific runs here.

`export_onnx` writes opset-17 ONNX with the TorchScript exporter (the dynamo exporter fails on NNCF
models). A stripped int8 model exports as QuantizeLinear/DequantizeLinear (Q/DQ) pairs, all int8 with
zero point 0, FP32 weights behind their own Q/DQ. The flavours rewrite that graph:

- `to_cpu_flavour` (ONNX Runtime): activations become uint8 so ORT fuses Conv/Add/pooling into
  QLinear* kernels: after a ReLU, int8 zp 0 -> uint8 zp 0 with the same scale; elsewhere int8 ->
  uint8 zp 128 (the same grid shifted, exact). DequantizeLinear moves past pure data movement
  (Slice, Pad, Flatten...) so what follows fuses too. Conv/Gemm biases become int32 behind a DQ.
  `amx_conv_weights` (applied at load time on AMX CPUs by backends/ort.py) routes wide convs to
  ORT's AMX kernels.
- `to_tensorrt_flavour`: int8 only, zero point 0, per-channel weights on axis 0, and the residual
  Add quantized on its identity input instead of on the conv branch, so conv + add fuse.

Both store weights as int8 initializers feeding DequantizeLinear directly (about 4x smaller files).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeres.errors import ExportError
from edgeres.io import atomic_write

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Ops that keep a tensor's values (or a subset, or zeros): a non-negative or on-grid input stays so.
_PASS_THROUGH = {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Slice", "Pad", "Reshape", "Flatten",
    "Transpose", "Squeeze", "Unsqueeze", "Identity",
}
# Pure data movement: a per-tensor quantized tensor passes through on the same grid (Pad fills the zero point).
_SINK_THROUGH = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad"}
# Below these, MLAS's symmetric VNNI conv beats its AMX QGEMM at batch 1 (ORT 1.31, 1 and 2 threads). 64-wide
# convs gain at batch 64 but lose at batch 1 (resnet20: 0.95x of quantize_static at batch 1 with them, 1.01x
# without); batch-1 latency comes first on the edge. Side by side: benchmarks/amx_threshold.py.
AMX_MIN_K = 256  # C_in * kh * kw
AMX_MIN_OUT = 128
_GRID_PRESERVING = {"MaxPool", "GlobalMaxPool", "Slice", "Pad", "Reshape", "Flatten", "Transpose", "Squeeze",
                    "Unsqueeze", "Identity"}


def export_onnx(
    model: nn.Module, path: str | Path, *, input_size: int, opset: int = OPSET, dynamic_batch: bool = True
) -> Path:
    """Export `model` (FP32, or stripped int8) for 3 x input_size x input_size images; written atomically."""
    path = Path(path)
    model = model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, input_size, input_size, device=device)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with atomic_write(path) as tmp:
        try:
            torch.onnx.export(
                model, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
            )
        except Exception as exc:  # noqa: BLE001  (the exporter raises many types; name the step)
            raise ExportError(f"ONNX export failed: {exc}; export a stripped model (compress.quantize.strip)") from exc
    return path


def save_onnx(onnx_model, path: str | Path) -> Path:
    """Check and write an in-memory ONNX model atomically."""
    import onnx

    path = Path(path)
    onnx.checker.check_model(onnx_model)
    with atomic_write(path) as tmp:
        onnx.save(onnx_model, str(tmp))
    return path


def export_int8(model: nn.Module, path: str | Path, backend, *, input_size: int) -> Path:
    """A stripped int8 model (`compress.quantize.strip`) as `backend`'s Q/DQ dialect at `path`: export, flavour, save.

    `backend.flavour` rewrites the exporter's symmetric int8 Q/DQ graph into what its runtime fuses best.
    """
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="edgeres-int8-") as tmp:
        raw = export_onnx(model, Path(tmp) / "raw.onnx", input_size=input_size)
        return save_onnx(backend.flavour(onnx.load(str(raw))), path)


class _Graph:
    """Producer/consumer maps and constant lookup over an ONNX graph (rebuilt after each edit pass)."""

    def __init__(self, model) -> None:
        self.model = model
        self.g = model.graph
        self.refresh()

    def refresh(self) -> None:
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def add_init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(name)
        self.g.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def insert_before(self, anchor, node) -> None:
        self.g.node.insert(list(self.g.node).index(anchor), node)
        self.producer.update({o: node for o in node.output})

    def unique(self, name: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}
        out, k = name, 1
        while out in taken:
            out, k = f"{name}_{k}", k + 1
        return out

    def prune_unused(self) -> None:
        used = {i for n in self.g.node for i in n.input} | self.outputs
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        graph_inputs = [i for i in self.g.input if i.name in used or i.name not in self.inits]
        del self.g.input[:]
        self.g.input.extend(graph_inputs)
        self.refresh()


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _zero_point(gr: _Graph, node) -> np.ndarray:
    if len(node.input) < 3 or not node.input[2]:
        x = gr.const(node.input[0]) if node.op_type == "DequantizeLinear" else None
        return np.zeros((), x.dtype if x is not None else np.uint8)  # no zero point: 0 of the input's type
    zp = gr.const(node.input[2])
    if zp is None:
        raise ExportError(f"{node.op_type} {node.name!r} has a non-constant zero point; export a stripped model")
    return zp


def _clear_value_info(model, names: set[str]) -> None:
    keep = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _bypass_constant_identities(gr: _Graph) -> None:
    """Point readers of Identity(initializer) (how the exporter shares zero points) at the initializer."""
    for n in [n for n in gr.g.node if n.op_type == "Identity" and n.input[0] in gr.inits]:
        if n.output[0] in gr.outputs:
            continue
        for c in gr.consumers[n.output[0]]:
            for k, name in enumerate(c.input):
                if name == n.output[0]:
                    c.input[k] = n.input[0]
        gr.g.node.remove(n)
    gr.refresh()


def store_int8_weights(onnx_model):
    """Replace each FP32 weight -> QuantizeLinear by its int8 (or uint8) values feeding DequantizeLinear."""
    model = copy.deepcopy(onnx_model)
    gr = _Graph(model)
    _bypass_constant_identities(gr)
    drop = []
    for q in [n for n in gr.g.node if n.op_type == "QuantizeLinear"]:
        w = gr.const(q.input[0])
        scale = gr.const(q.input[1])
        if w is None or scale is None or w.dtype != np.float32:
            continue
        zp = _zero_point(gr, q)
        axis = _attr(q, "axis", 1)
        shape = [1] * w.ndim
        if scale.size > 1:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        qw = np.rint(w / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape)  # rint: ties to even
        qname = gr.add_init(f"{q.input[0]}_quantized", np.clip(qw, info.min, info.max).astype(zp.dtype))
        for dq in gr.consumers[q.output[0]]:
            dq.input[0] = qname
        drop.append(q)
    for q in drop:
        gr.g.node.remove(q)
    gr.prune_unused()
    return model


def _is_weight_dq(gr: _Graph, dq) -> bool:
    return dq.op_type == "DequantizeLinear" and dq.input[0] in gr.inits


def _activation_qdq(gr: _Graph):
    """Activation QuantizeLinear nodes with their DequantizeLinear consumers."""
    for q in [n for n in gr.g.node if n.op_type == "QuantizeLinear"]:
        if gr.const(q.input[0]) is None:
            yield q, [c for c in gr.consumers[q.output[0]] if c.op_type == "DequantizeLinear"]


def _nonnegative(gr: _Graph) -> set[str]:
    """Tensors that are >= 0 by construction: ReLU outputs and what passes them through unchanged."""
    nonneg: set[str] = set()
    for n in gr.g.node:  # ONNX nodes are topologically sorted
        if n.op_type == "Relu" or (n.op_type in _PASS_THROUGH | {"QuantizeLinear", "DequantizeLinear"}
                                   and n.input and n.input[0] in nonneg):
            nonneg.update(n.output)
    return nonneg


def _retype(gr: _Graph, q, dqs, zero_point: np.ndarray) -> None:
    name = gr.add_init(f"{q.output[0]}_zero_point", zero_point)
    for node in [q, *dqs]:
        if len(node.input) < 3:
            node.input.append(name)
        else:
            node.input[2] = name
    _clear_value_info(gr.model, {q.output[0]})


def _int32_bias(gr: _Graph) -> int:
    """FP32 Conv/Gemm bias -> int32 behind a DequantizeLinear with scale input_scale * weight_scale."""
    import onnx

    done = 0
    for node in [n for n in gr.g.node if n.op_type in ("Conv", "Gemm")]:
        if len(node.input) < 3 or node.input[2] not in gr.inits:
            continue
        x_dq, w_dq = gr.producer.get(node.input[0]), gr.producer.get(node.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or not _is_weight_dq(gr, w_dq):
            continue
        if node.op_type == "Gemm" and (_attr(node, "transB", 0) != 1 or _attr(node, "transA", 0) != 0):
            continue
        bias = gr.const(node.input[2])
        s_x, s_w = gr.const(x_dq.input[1]), gr.const(w_dq.input[1])
        if bias is None or s_x is None or s_w is None or s_x.size != 1 or bias.dtype != np.float32:
            continue
        scale = (s_x.reshape(()) * s_w.reshape(-1)).astype(np.float32)
        scale = np.broadcast_to(scale, bias.shape).copy() if scale.size == 1 else scale
        qb = np.clip(np.rint(bias / scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        qname = gr.add_init(f"{node.input[2]}_quantized", qb)
        sname = gr.add_init(f"{node.input[2]}_scale", scale)
        out = gr.unique(f"{node.input[2]}_dequantized")
        dq = onnx.helper.make_node("DequantizeLinear", [qname, sname], [out], name=out, axis=0)  # zp: 0
        gr.insert_before(node, dq)
        node.input[2] = out
        done += 1
    gr.prune_unused()
    return done


def _sinkable(gr: _Graph, dq) -> list:
    """Readers of activation DQ `dq` (per-tensor) that only move data and read it as their data input only."""
    if _is_weight_dq(gr, dq) or dq.output[0] in gr.outputs:
        return []
    scale = gr.const(dq.input[1])
    if scale is None or scale.size != 1:  # a per-channel axis would move with Transpose/Reshape
        return []
    readers = []
    for c in gr.consumers[dq.output[0]]:
        if c.op_type not in _SINK_THROUGH or c.input[0] != dq.output[0] or dq.output[0] in c.input[1:]:
            continue
        if c.op_type == "Pad":
            value = gr.const(c.input[2]) if len(c.input) > 2 and c.input[2] else np.zeros(())
            if _attr(c, "mode", b"constant") not in (b"constant", "constant") or value is None or np.any(value != 0):
                continue
        readers.append(c)
    return readers


def _sink_dequantize(gr: _Graph) -> int:
    """DQ -> Slice/Pad/Flatten/... becomes Slice/Pad/Flatten/... -> DQ (exact; Pad fills the zero point).

    ORT then fuses the DQ with what follows: option-A shortcuts (DQ -> Slice -> Pad -> Add) into QLinearAdd,
    DQ -> Flatten -> Gemm into QGemm. Returns how many moves were made.
    """
    import onnx

    moved = 0
    while True:
        found = next(((dq, c) for dq in gr.g.node if dq.op_type == "DequantizeLinear" for c in _sinkable(gr, dq)),
                     None)
        if found is None:
            return moved
        dq, c = found
        out = c.output[0]
        quantized = gr.unique(f"{out}_quantized")
        c.input[0], c.output[0] = dq.input[0], quantized
        if c.op_type == "Pad" and (np.any(_zero_point(gr, dq) != 0) or (len(c.input) > 2 and c.input[2])):
            c.input.extend([""] * (3 - len(c.input)))
            c.input[2] = gr.add_init(f"{out}_pad_value", _zero_point(gr, dq).reshape(()))
        new = onnx.helper.make_node("DequantizeLinear", [quantized, *dq.input[1:]], [out], name=gr.unique(f"{out}_dq"))
        gr.g.node.insert(list(gr.g.node).index(c) + 1, new)
        if len(gr.consumers[dq.output[0]]) == 1:
            gr.g.node.remove(dq)
        _clear_value_info(gr.model, {out, quantized})
        gr.refresh()
        moved += 1


def amx_conv_weights(onnx_model, *, min_k: int = AMX_MIN_K, min_out: int = AMX_MIN_OUT):
    """Wide convs' int8 weights shifted by -1 with zero point -1 (exact); returns (model, convs changed).

    With weight zero point 0, ORT's QLinearConv takes MLAS's symmetric conv kernels (AVX512-VNNI); with one
    non-zero zero point for all channels it takes the general QGEMM, which has Intel AMX kernels
    (onnxruntime#14042): 1.2-2.2x faster per conv on AMX CPUs when K = C_in*kh*kw >= 256 and C_out >= 128, slower
    below at batch 1, and no gain without AMX. So the file stays portable and backends/ort.py applies this at
    load time.
    """
    model = copy.deepcopy(onnx_model)
    gr = _Graph(model)
    changed = 0
    for conv in [n for n in gr.g.node if n.op_type == "Conv"]:
        dq = gr.producer.get(conv.input[1])
        if dq is None or not _is_weight_dq(gr, dq) or len(gr.consumers[dq.input[0]]) != 1:
            continue
        w, scale = gr.const(dq.input[0]), gr.const(dq.input[1])
        if w.dtype != np.int8 or w.ndim < 3 or _attr(conv, "group", 1) != 1 or np.any(_zero_point(gr, dq) != 0):
            continue
        if int(np.prod(w.shape[1:])) < min_k or w.shape[0] < min_out:
            continue
        shift = -1 if w.min() > -128 else 1 if w.max() < 127 else 0  # NNCF's weights lie in [-127, 127]
        if shift == 0:
            continue
        dq.input[0] = gr.add_init(f"{dq.input[0]}_amx", (w.astype(np.int16) + shift).astype(np.int8))
        zero_point = gr.add_init(f"{dq.input[0]}_zero_point", np.full(scale.shape, shift, np.int8))
        dq.input.extend([""] * (3 - len(dq.input)))
        dq.input[2] = zero_point
        changed += 1
    gr.prune_unused()
    return model, changed


def to_cpu_flavour(onnx_model):
    """Q/DQ layout for ONNX Runtime on CPU: uint8 activations, int8 weights, int32 biases."""
    model = store_int8_weights(onnx_model)
    gr = _Graph(model)
    nonneg = _nonnegative(gr)
    for q, dqs in list(_activation_qdq(gr)):
        zp = _zero_point(gr, q)
        if zp.dtype != np.int8:
            continue
        if np.any(zp != 0):
            raise ExportError(f"QuantizeLinear {q.name!r} has a non-zero int8 zero point; expected symmetric int8")
        # After a ReLU the int8 codes are 0..127: the same codes in uint8 (zp 0) let ORT drop the ReLU.
        # Elsewhere the whole int8 grid shifts by 128 into uint8 (zp 128): identical dequantized values.
        _retype(gr, q, dqs, np.zeros(zp.shape, np.uint8) if q.input[0] in nonneg else np.full(zp.shape, 128, np.uint8))
    gr.refresh()
    _sink_dequantize(gr)
    gr.prune_unused()
    _int32_bias(gr)
    return short_tensor_names(model)


def _trace_to_dq(gr: _Graph, name: str):
    """The DequantizeLinear a tensor comes from through grid-preserving ops (slice, pad, reshape...)."""
    while True:
        node = gr.producer.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            return node
        if node.op_type not in _GRID_PRESERVING:
            return None
        if node.op_type == "Pad" and (_attr(node, "mode", b"constant") not in (b"constant", "constant")
                                      or (len(node.input) > 2 and node.input[2]
                                          and np.any(gr.const(node.input[2]) != 0))):
            return None
        name = node.input[0]


def _conv_branch(gr: _Graph, add, i: int):
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


def _move_add_qdq_to_identity(gr: _Graph) -> int:
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
    gr = _Graph(model)
    for node in gr.g.node:
        if node.domain not in ("", "ai.onnx"):
            raise ExportError(f"op {node.domain}::{node.op_type} is not standard ONNX; export a stripped model")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = _zero_point(gr, node)
        if zp.dtype != np.int8 or np.any(zp != 0):
            raise ExportError(
                f"{node.op_type} {node.name!r} is {zp.dtype} with zero point {zp.max()}; TensorRT needs int8 "
                "zero point 0: quantize with signed activations (QuantizeOptions(signed_activations=True))"
            )
        if _is_weight_dq(gr, node) and gr.const(node.input[1]).size > 1 and _attr(node, "axis", 1) != 0:
            raise ExportError(f"per-channel weight scales of {node.name!r} are not on axis 0")
    _move_add_qdq_to_identity(gr)
    return short_tensor_names(model)


def short_tensor_names(onnx_model):
    """Rename intermediate tensors to `t<k>_<op>`: the exporter's NNCF scope paths are a tenth of an int8 file."""
    model = copy.deepcopy(onnx_model)
    g = model.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output} | {t.name for t in g.initializer}
    rename: dict[str, str] = {}
    for k, node in enumerate(g.node):
        for j, out in enumerate(node.output):
            if out and out not in keep:
                rename[out] = f"t{k}_{node.op_type}" + (f"_{j}" if j else "")
        for j, name in enumerate(node.input):
            node.input[j] = rename.get(name, name)
        for j, name in enumerate(node.output):
            node.output[j] = rename.get(name, name)
    for vi in g.value_info:
        vi.name = rename.get(vi.name, vi.name)
    return model


def qdq_summary(onnx_model) -> list[dict]:
    """One row per Q/DQ node: op, zero-point dtype, zero points, scale count, axis, weight or not, producer op."""
    gr = _Graph(onnx_model)
    rows = []
    for n in gr.g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = _zero_point(gr, n)
        scale = gr.const(n.input[1])
        src = gr.producer.get(n.input[0])
        rows.append({
            "op": n.op_type,
            "name": n.name,
            "dtype": str(zp.dtype),
            "zero_points": sorted({int(v) for v in np.ravel(zp)}),
            "scales": int(scale.size) if scale is not None else 0,
            "axis": _attr(n, "axis", 1),
            "weight": n.input[0] in gr.inits,
            "source_op": src.op_type if src is not None else "input",
        })
    return rows


def to_openvino_flavour(onnx_model):
    """Q/DQ layout for OpenVINO on CPU: NNCF's own OpenVINO convention, uint8 after ReLU, int8 elsewhere.

    Post-ReLU int8 zp 0 -> uint8 zp 0 with the same scale (lossless); other activations stay symmetric int8
    and biases stay FP32, so `ov.convert_model` yields one FakeQuantize per pair, fused into int8 kernels,
    and a smaller IR than the CPU flavour (whose int32 biases and uint8 zp-128 shifts add layers). BNs that
    were quantized as depthwise convs go back to Mul/Add for OpenVINO to fuse (`bn_convs_as_affine`).
    """
    model = store_int8_weights(onnx_model)
    gr = _Graph(model)
    nonneg = _nonnegative(gr)
    for q, dqs in list(_activation_qdq(gr)):
        zp = _zero_point(gr, q)
        if zp.dtype != np.int8 or q.input[0] not in nonneg:
            continue
        if np.any(zp != 0):
            raise ExportError(f"QuantizeLinear {q.name!r} has a non-zero int8 zero point; expected symmetric int8")
        _retype(gr, q, dqs, np.zeros(zp.shape, np.uint8))
    gr.prune_unused()
    bn_convs_as_affine(gr)
    return short_tensor_names(model)


def _bn_conv(gr: _Graph, conv) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) of a depthwise 1x1 conv that stands for a BN (fold_bn's bn_as_depthwise), else None."""
    if conv.op_type != "Conv" or len(conv.input) < 2:
        return None
    wdq = gr.producer.get(conv.input[1])
    if wdq is None or not _is_weight_dq(gr, wdq) or np.any(_zero_point(gr, wdq) != 0):
        return None
    w, w_scale = gr.const(wdq.input[0]), gr.const(wdq.input[1])
    channels = w.shape[0]
    if w.shape[1:] != (1, 1, 1) or _attr(conv, "group", 1) != channels:
        return None
    if any(v != 1 for v in _attr(conv, "strides", [1])) or any(v != 0 for v in _attr(conv, "pads", [0])):
        return None
    bias = gr.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(channels, np.float32)
    if bias is None:
        return None
    scale = w.reshape(channels).astype(np.float32) * np.broadcast_to(w_scale.astype(np.float32), (channels,))
    return scale, bias.astype(np.float32)


def bn_convs_as_affine(gr: _Graph) -> int:
    """OpenVINO flavour: BN-as-depthwise-conv back to Mul/Add, on the unquantized input where nothing else uses it.

    OpenVINO's CPU plugin fuses a per-channel Mul/Add with the ReLU and FakeQuantize after it, into the conv
    that produced the input when that residual sum has no other use, else into one jit kernel: the runtime
    graph of OpenVINO's own NNCF path, and faster than a depthwise conv (wrn-16-4, static shapes, 2 threads:
    0.94-0.95x of NNCF's IR with the depthwise convs, 1.00-1.01x like this). Where the input's quantization
    serves only the BN it is dropped, which keeps the sum in FP32 as that path does (one rounding fewer).
    Returns the number of convs rewritten.
    """
    import onnx

    changed = 0
    for conv in [n for n in gr.g.node if n.op_type == "Conv"]:
        affine = _bn_conv(gr, conv)
        if affine is None:
            continue
        scale, shift = affine
        x = conv.input[0]
        dq = gr.producer.get(x)
        q = gr.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and all(
                len(gr.consumers[t]) == 1 for t in (x, q.output[0], q.input[0])) and q.input[0] not in gr.outputs:
            x = q.input[0]  # the quantization only fed this BN: read the FP32 value
        shape = (1, -1, 1, 1)
        mul_out = gr.unique(f"{conv.output[0]}_scaled")
        mul = onnx.helper.make_node("Mul", [x, gr.add_init(f"{conv.name}_scale", scale.reshape(shape))], [mul_out],
                                    name=gr.unique(f"{conv.name}_mul"))
        add = onnx.helper.make_node("Add", [mul_out, gr.add_init(f"{conv.name}_shift", shift.reshape(shape))],
                                    [conv.output[0]], name=gr.unique(f"{conv.name}_add"))
        at = list(gr.g.node).index(conv)
        gr.g.node.remove(conv)
        gr.g.node.insert(at, add)
        gr.g.node.insert(at, mul)
        _clear_value_info(gr.model, {conv.output[0]})
        gr.refresh()
        changed += 1
    _drop_dead_nodes(gr)
    gr.prune_unused()
    return changed


def _drop_dead_nodes(gr: _Graph) -> None:
    """Remove nodes none of whose outputs is used (e.g. a Q/DQ pair that fed only a rewritten node)."""
    while dead := [n for n in gr.g.node if not any(o in gr.outputs or gr.consumers.get(o) for o in n.output)]:
        for n in dead:
            gr.g.node.remove(n)
        gr.refresh()
