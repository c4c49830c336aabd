"""ONNX graphs in memory: load a file, look around a graph, edit it, and the Q/DQ facts every dialect shares.

`load` reads an .onnx file (one-line errors for a missing or unreadable file). `GraphView` is a read-only
look at a graph (producers, consumers, constants seen through the exporter's Identity habit: the linter's
view); `Graph` is the editable one the Q/DQ rewrites use (rebuilt after each edit pass). The helpers below
them hold what all Q/DQ dialects share: int8 weights stored as initializers, activation Q/DQ pairs, zero
points, tensors non-negative by construction, short tensor names. The dialects themselves (ONNX Runtime's,
OpenVINO's, TensorRT's) live with their backends (`Backend.flavour`).
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from edgeres.errors import ExportError

if TYPE_CHECKING:
    import onnx

QDQ = ("QuantizeLinear", "DequantizeLinear")
# Ops that keep a tensor's values (or a subset, or zeros): a non-negative or on-grid input stays so.
PASS_THROUGH = {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Slice", "Pad", "Reshape", "Flatten",
    "Transpose", "Squeeze", "Unsqueeze", "Identity",
}


def load(path_or_model: str | os.PathLike | onnx.ModelProto, *,
         load_external_data: bool = True) -> onnx.ModelProto:
    """The ONNX model in a file; ExportError (one line) for a missing, corrupt, truncated or empty one."""
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    path = os.fspath(path_or_model)
    if not os.path.isfile(path):
        raise ExportError(f"ONNX file {path} not found; export the model first (edgeres export)")
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except Exception as exc:  # onnx raises DecodeError / ValueError / OSError for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ExportError(f"{path} is not a readable ONNX model ({first}); export it again") from exc
    if not model.graph.node or not model.graph.input or not model.graph.output:
        # protobuf reads many byte strings (an empty file among them) as a model with no graph
        raise ExportError(f"{path} is not an ONNX model (no graph inside); export it again")
    return model


class GraphView:
    """Producers, consumers and constant values of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.label: dict[int, str] = {}
        for i, node in enumerate(self.nodes):
            self.label[id(node)] = node.name or f"{node.op_type}#{i}"
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(a.t)
            elif node.op_type == "Identity" and node.input[0] in self.consts:
                self.consts[node.output[0]] = self.consts[node.input[0]]   # the TorchScript exporter's habit

    def name(self, node: onnx.NodeProto) -> str:
        return self.label[id(node)]

    def of_type(self, *ops: str) -> Iterator[onnx.NodeProto]:
        return (n for n in self.nodes if n.op_type in ops)

    def const(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if index < len(node.input) and node.input[index]:
            return self.consts.get(node.input[index])
        return None

    def has_qdq(self) -> bool:
        return any(n.op_type in QDQ for n in self.nodes)

    def is_weight(self, dq: onnx.NodeProto) -> bool:
        """True for a DequantizeLinear on a constant, directly or through its QuantizeLinear."""
        src = dq.input[0]
        if src in self.consts:
            return True
        q = self.producer.get(src)
        return q is not None and q.op_type == "QuantizeLinear" and q.input[0] in self.consts

    def source(self, tensor: str) -> onnx.NodeProto | None:
        """Producer of `tensor`, looking through BatchNormalization / Identity."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in ("BatchNormalization", "Identity"):
            node = self.producer.get(node.input[0])
        return node

    def behind_qdq(self, tensor: str) -> str | None:
        """If `tensor` is DQ(Q(t)), return t."""
        dq = self.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer.get(dq.input[0])
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]


class Graph:
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


def attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def zero_point(gr: Graph, node) -> np.ndarray:
    if len(node.input) < 3 or not node.input[2]:
        x = gr.const(node.input[0]) if node.op_type == "DequantizeLinear" else None
        return np.zeros((), x.dtype if x is not None else np.uint8)  # no zero point: 0 of the input's type
    zp = gr.const(node.input[2])
    if zp is None:
        raise ExportError(f"{node.op_type} {node.name!r} has a non-constant zero point; export a stripped model")
    return zp


def clear_value_info(model, names: set[str]) -> None:
    keep = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _bypass_constant_identities(gr: Graph) -> None:
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
    gr = Graph(model)
    _bypass_constant_identities(gr)
    drop = []
    for q in [n for n in gr.g.node if n.op_type == "QuantizeLinear"]:
        w = gr.const(q.input[0])
        scale = gr.const(q.input[1])
        if w is None or scale is None or w.dtype != np.float32:
            continue
        zp = zero_point(gr, q)
        axis = attr(q, "axis", 1)
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


def is_weight_dq(gr: Graph, dq) -> bool:
    return dq.op_type == "DequantizeLinear" and dq.input[0] in gr.inits


def activation_qdq(gr: Graph):
    """Activation QuantizeLinear nodes with their DequantizeLinear consumers."""
    for q in [n for n in gr.g.node if n.op_type == "QuantizeLinear"]:
        if gr.const(q.input[0]) is None:
            yield q, [c for c in gr.consumers[q.output[0]] if c.op_type == "DequantizeLinear"]


def nonnegative(gr: Graph) -> set[str]:
    """Tensors that are >= 0 by construction: ReLU outputs and what passes them through unchanged."""
    nonneg: set[str] = set()
    for n in gr.g.node:  # ONNX nodes are topologically sorted
        if n.op_type == "Relu" or (n.op_type in PASS_THROUGH | {"QuantizeLinear", "DequantizeLinear"}
                                   and n.input and n.input[0] in nonneg):
            nonneg.update(n.output)
    return nonneg


def retype(gr: Graph, q, dqs, zero_point: np.ndarray) -> None:
    name = gr.add_init(f"{q.output[0]}_zero_point", zero_point)
    for node in [q, *dqs]:
        if len(node.input) < 3:
            node.input.append(name)
        else:
            node.input[2] = name
    clear_value_info(gr.model, {q.output[0]})


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
    gr = Graph(onnx_model)
    rows = []
    for n in gr.g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = zero_point(gr, n)
        scale = gr.const(n.input[1])
        src = gr.producer.get(n.input[0])
        rows.append({
            "op": n.op_type,
            "name": n.name,
            "dtype": str(zp.dtype),
            "zero_points": sorted({int(v) for v in np.ravel(zp)}),
            "scales": int(scale.size) if scale is not None else 0,
            "axis": attr(n, "axis", 1),
            "weight": n.input[0] in gr.inits,
            "source_op": src.op_type if src is not None else "input",
        })
    return rows


def drop_dead_nodes(gr: Graph) -> None:
    """Remove nodes none of whose outputs is used (e.g. a Q/DQ pair that fed only a rewritten node)."""
    while dead := [n for n in gr.g.node if not any(o in gr.outputs or gr.consumers.get(o) for o in n.output)]:
        for n in dead:
            gr.g.node.remove(n)
        gr.refresh()


def fold_constants(onnx_model) -> onnx.ModelProto:
    """A copy where every standard node computed from constants alone is replaced by its value (an initializer).

    Evaluated by ONNX's own reference implementation (numpy, no runtime). Q/DQ stay as they are: weights keep
    their quantization, and the reference has no Q/DQ before opset 19. The exporter computes the option-A
    shortcut's Pad pads this way, which stops ONNX shape inference until they are folded.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = onnx_model.graph
    inits = {t.name for t in g.initializer}
    known = set(inits)
    folded, kept = [], []
    for n in g.node:
        if n.domain in ("", "ai.onnx") and n.op_type not in QDQ and all(not i or i in known for i in n.input):
            folded.append(n)
            known.update(o for o in n.output if o)
        else:
            kept.append(n)
    needed = sorted({i for n in kept for i in n.input if i in known and i not in inits}
                    | {o.name for o in g.output if o.name in known and o.name not in inits})
    model = copy.deepcopy(onnx_model)
    if not needed:
        return model
    sub = onnx.helper.make_graph(folded, "constants", [], [onnx.helper.make_empty_tensor_value_info(n) for n in needed],
                                 initializer=list(g.initializer))
    try:
        values = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=onnx_model.opset_import,
                                                           ir_version=onnx_model.ir_version)).run(None, {})
    except Exception:  # noqa: BLE001  (an op the reference lacks: shapes behind it stay unknown, and say so)
        return model
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name)
                                   for name, v in zip(needed, values, strict=True))
    return model


def tensor_shapes(onnx_model, names: list[str]) -> dict[str, tuple[int | None, ...]]:
    """Shapes of the named tensors from ONNX shape inference over the constant-folded graph (None: unknown dim)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(fold_constants(onnx_model), data_prop=True)
    g = model.graph
    infos = {v.name: v for v in [*g.input, *g.value_info, *g.output]}
    out = {}
    for name in names:
        if name in infos and infos[name].type.tensor_type.HasField("shape"):
            out[name] = tuple(d.dim_value if d.HasField("dim_value") else None
                              for d in infos[name].type.tensor_type.shape.dim)
    return out
