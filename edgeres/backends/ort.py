"""ONNX Runtime on CPU: the flavoured ONNX file is the artifact; ORT fuses Q/DQ into QLinear* at load.

The CPU-flavour file already holds int8 weights, so it is as small as ORT's own optimized model;
ORT's fully optimized graph is machine-specific (NCHWc layouts), so it is built at load time, not shipped.

Its Q/DQ dialect (`to_cpu_flavour`, `OrtBackend.flavour`): activations become uint8 so ORT fuses Conv/Add/pooling
into QLinear* kernels: after a ReLU, int8 zp 0 -> uint8 zp 0 with the same scale; elsewhere int8 -> uint8 zp 128
(the same grid shifted, exact). DequantizeLinear moves past pure data movement (Slice, Pad, Flatten...) so what
follows fuses too. Conv/Gemm biases become int32 behind a DQ. `amx_conv_weights` (applied at load time on AMX
CPUs) routes wide convs to ORT's AMX kernels.
"""

from __future__ import annotations

import collections
import copy
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeres.backends.base import Artifact, RuntimeOptions
from edgeres.coverage import Coverage, from_layers
from edgeres.errors import ExportError
from edgeres.fallback import all_layers, module_name
from edgeres.hostcpu import has_amx_int8
from edgeres.io import atomic_write, sha256sum
from edgeres.onnxgraph import (
    Graph,
    activation_qdq,
    attr,
    clear_value_info,
    is_weight_dq,
    nonnegative,
    retype,
    short_tensor_names,
    store_int8_weights,
    zero_point,
)
from edgeres.peakmem import PeakMemory, peak_rise, summarize

if TYPE_CHECKING:
    from edgeres.targets import Target

PROVIDERS = ["CPUExecutionProvider"]


# --- the Q/DQ dialect ONNX Runtime fuses best ---------------------------------------------------------

# Pure data movement: a per-tensor quantized tensor passes through on the same grid (Pad fills the zero point).
_SINK_THROUGH = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad"}

# Below these, MLAS's symmetric VNNI conv beats its AMX QGEMM at batch 1 (ORT 1.31, 1 and 2 threads). 64-wide
# convs gain at batch 64 but lose at batch 1 (resnet20: 0.95x of quantize_static at batch 1 with them, 1.01x
# without); batch-1 latency comes first on the edge. Side by side: benchmarks/amx_threshold.py.
AMX_MIN_K = 256  # C_in * kh * kw
AMX_MIN_OUT = 128


def _int32_bias(gr: Graph) -> int:
    """FP32 Conv/Gemm bias -> int32 behind a DequantizeLinear with scale input_scale * weight_scale."""
    import onnx

    done = 0
    for node in [n for n in gr.g.node if n.op_type in ("Conv", "Gemm")]:
        if len(node.input) < 3 or node.input[2] not in gr.inits:
            continue
        x_dq, w_dq = gr.producer.get(node.input[0]), gr.producer.get(node.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or not is_weight_dq(gr, w_dq):
            continue
        if node.op_type == "Gemm" and (attr(node, "transB", 0) != 1 or attr(node, "transA", 0) != 0):
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


def _sinkable(gr: Graph, dq) -> list:
    """Readers of activation DQ `dq` (per-tensor) that only move data and read it as their data input only."""
    if is_weight_dq(gr, dq) or dq.output[0] in gr.outputs:
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
            if attr(c, "mode", b"constant") not in (b"constant", "constant") or value is None or np.any(value != 0):
                continue
        readers.append(c)
    return readers


def _sink_dequantize(gr: Graph) -> int:
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
        if c.op_type == "Pad" and (np.any(zero_point(gr, dq) != 0) or (len(c.input) > 2 and c.input[2])):
            c.input.extend([""] * (3 - len(c.input)))
            c.input[2] = gr.add_init(f"{out}_pad_value", zero_point(gr, dq).reshape(()))
        new = onnx.helper.make_node("DequantizeLinear", [quantized, *dq.input[1:]], [out], name=gr.unique(f"{out}_dq"))
        gr.g.node.insert(list(gr.g.node).index(c) + 1, new)
        if len(gr.consumers[dq.output[0]]) == 1:
            gr.g.node.remove(dq)
        clear_value_info(gr.model, {out, quantized})
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
    gr = Graph(model)
    changed = 0
    for conv in [n for n in gr.g.node if n.op_type == "Conv"]:
        dq = gr.producer.get(conv.input[1])
        if dq is None or not is_weight_dq(gr, dq) or len(gr.consumers[dq.input[0]]) != 1:
            continue
        w, scale = gr.const(dq.input[0]), gr.const(dq.input[1])
        if w.dtype != np.int8 or w.ndim < 3 or attr(conv, "group", 1) != 1 or np.any(zero_point(gr, dq) != 0):
            continue
        if int(np.prod(w.shape[1:])) < min_k or w.shape[0] < min_out:
            continue
        shift = -1 if w.min() > -128 else 1 if w.max() < 127 else 0  # NNCF's weights lie in [-127, 127]
        if shift == 0:
            continue
        dq.input[0] = gr.add_init(f"{dq.input[0]}_amx", (w.astype(np.int16) + shift).astype(np.int8))
        zp_name = gr.add_init(f"{dq.input[0]}_zero_point", np.full(scale.shape, shift, np.int8))
        dq.input.extend([""] * (3 - len(dq.input)))
        dq.input[2] = zp_name
        changed += 1
    gr.prune_unused()
    return model, changed


def to_cpu_flavour(onnx_model):
    """Q/DQ layout for ONNX Runtime on CPU: uint8 activations, int8 weights, int32 biases."""
    model = store_int8_weights(onnx_model)
    gr = Graph(model)
    nonneg = nonnegative(gr)
    for q, dqs in list(activation_qdq(gr)):
        zp = zero_point(gr, q)
        if zp.dtype != np.int8:
            continue
        if np.any(zp != 0):
            raise ExportError(f"QuantizeLinear {q.name!r} has a non-zero int8 zero point; expected symmetric int8")
        # After a ReLU the int8 codes are 0..127: the same codes in uint8 (zp 0) let ORT drop the ReLU.
        # Elsewhere the whole int8 grid shifts by 128 into uint8 (zp 128): identical dequantized values.
        retype(gr, q, dqs, np.zeros(zp.shape, np.uint8) if q.input[0] in nonneg else np.full(zp.shape, 128, np.uint8))
    gr.refresh()
    _sink_dequantize(gr)
    gr.prune_unused()
    _int32_bias(gr)
    return short_tensor_names(model)


def session_options(options: RuntimeOptions | None, optimized_path: Path | None = None):
    """ONNX Runtime session settings, the one place they are made: all graph optimizations, quiet logs, threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # warnings about serializing hardware-specific graphs are expected here
    if options is not None and options.threads:
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def _model_for_host(onnx_path: Path) -> str | bytes:
    """The file as is, or on AMX CPUs with wide convs routed to ORT's AMX kernels (`amx_conv_weights`)."""
    from edgeres.onnxgraph import load
    if not has_amx_int8():
        return str(onnx_path)
    model, changed = amx_conv_weights(load(onnx_path))
    return model.SerializeToString() if changed else str(onnx_path)


def precision_of(onnx_path: Path) -> str:
    """"int8" when the graph holds QuantizeLinear/DequantizeLinear, "fp16" for FP16 weights, else "fp32"."""
    import onnx

    from edgeres.onnxgraph import load

    model = load(onnx_path, load_external_data=False)  # one-line error for a corrupt or empty file
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def optimized_op_types(onnx_path: str | Path, options: RuntimeOptions | None = None) -> collections.Counter:
    """Op types in the graph ORT actually runs (after its Q/DQ fusions), e.g. {"QLinearConv": 19, ...}."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(_model_for_host(Path(onnx_path)), session_options(options, opt), providers=PROVIDERS)
        return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


class OrtBackend:
    """ONNX Runtime CPU execution provider."""

    name = "onnxruntime"
    suffix = ".onnx"
    fallback_precision = "fp32"  # what a layer kept out of INT8 runs in (--max-drop)
    reads = (".onnx",)
    qdq_flavour = "cpu"  # what a target's `qdq_flavour` names for this dialect
    custom_domains = frozenset({"com.microsoft"})  # ORT's contrib ops run too
    lint_rules = ()
    precisions = ("fp32", "int8")  # what its artifacts can run as

    @property
    def runs_on_host(self) -> bool:
        """The CPU execution provider runs wherever ONNX Runtime is installed."""
        return importlib.util.find_spec("onnxruntime") is not None

    def flavour(self, qdq):
        """The exporter's symmetric int8 Q/DQ ONNX in this runtime's dialect (`to_cpu_flavour`)."""
        return to_cpu_flavour(qdq)

    def compile(self, onnx: Path, target: Target, out: Path) -> Artifact:
        """Copy the (flavoured) ONNX to `out` after checking ORT loads it; the artifact records its facts."""
        onnx, out = Path(onnx), Path(out)
        try:
            ops = optimized_op_types(onnx)
        except Exception as exc:  # noqa: BLE001  (ORT raises its own exception types)
            raise ExportError(f"ONNX Runtime cannot load {onnx}: {exc}; re-export the model") from exc
        with atomic_write(out) as tmp:
            shutil.copyfile(onnx, tmp)
        meta = {
            "target": getattr(target, "name", None),
            "bytes": out.stat().st_size,
            "sha256": sha256sum(out),
            "qlinear_ops": sum(v for k, v in ops.items() if k.startswith("QLinear")),
        }
        return Artifact(path=out, runtime=self.name, precision=precision_of(out), meta=meta)

    def open(self, path: Path) -> Artifact:
        """A model.onnx as it is: int8 when it holds Q/DQ, fp16 for FP16 weights, else fp32."""
        path = Path(path)
        return Artifact(path=path, runtime=self.name, precision=precision_of(path), meta={"bytes": path.stat().st_size})

    def meta_text(self, path: Path) -> tuple[str | None, str]:
        """The edgeres metadata record in the file's metadata_props (None without one), and where it was looked for."""
        from edgeres.artifact_meta import onnx_meta_text

        return onnx_meta_text(path), "its metadata_props"

    def bundle_extras(self, folder: Path, target, **facts) -> dict:
        """Nothing beside the artifact: it stands alone."""
        return {}

    def load(self, artifact: Artifact, options: RuntimeOptions | None = None):
        import onnxruntime as ort

        if options is not None and options.device not in (None, "cpu"):
            raise ExportError(f"the onnxruntime backend runs on the CPU only, got device {options.device!r}")
        model = _model_for_host(artifact.path)
        try:
            return ort.InferenceSession(model, session_options(options), providers=PROVIDERS)
        except Exception as exc:  # noqa: BLE001  (ORT raises its own types: InvalidProtobuf, InvalidGraph, Fail...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ExportError(f"ONNX Runtime cannot load {artifact.path} ({first}); export it again") from exc

    def int8_coverage(self, artifact: Artifact, session=None, layers=None, options: RuntimeOptions | None = None
                      ) -> Coverage:
        """INT8 share of MACs measured from the graph ORT runs on this host (coverage.Coverage)."""
        import onnx

        layers = layers if layers is not None else all_layers(onnx.load(str(artifact.path)))
        int8 = {module_name(w) for w in int8_weights(artifact.path, options)}
        return from_layers(layers, int8, "measured: ONNX Runtime's optimized graph (QLinearConv/QGemm kernels)")

    def run(self, session, batch: np.ndarray) -> np.ndarray:
        name = session.get_inputs()[0].name
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def peak_memory(self, artifact: Artifact, *, batch: int, input_shape: tuple[int, ...],
                    options: RuntimeOptions | None = None) -> PeakMemory:
        """The rise of this process's peak RSS during one run at `batch`, the median of three (memory.measure_peak
        calls it in a fresh process). The CPU arena and memory patterns are off, so each run allocates and frees
        what it needs (an arena would keep the first run's memory and hide the next run's peak)."""
        import onnxruntime as ort

        so = session_options(options)
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        session = ort.InferenceSession(_model_for_host(artifact.path), so, providers=PROVIDERS)
        x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
        feed = {session.get_inputs()[0].name: x}
        runs = [peak_rise(lambda: session.run(None, feed)) for _ in range(3)]
        settings = {"graph_optimization_level": "ORT_ENABLE_ALL", "enable_cpu_mem_arena": False,
                    "enable_mem_pattern": False, "intra_op_num_threads": so.intra_op_num_threads}
        return summarize(self.name, batch, runs, settings)


# Fused int8 kernels in ORT's optimized graph, and the input that holds the layer's weight.
INT8_KERNELS = {"QLinearConv": 3, "QGemm": 3, "QLinearMatMul": 3, "ConvInteger": 1, "MatMulInteger": 1}


def int8_weights(onnx_path: str | Path, options: RuntimeOptions | None = None) -> set[str]:
    """Weight initializers read by int8 kernels in the graph ORT actually runs on this host.

    The session writes its optimized graph (`optimized_model_filepath`): a Conv whose Q/DQ ORT fused runs as
    QLinearConv there; one it could not fuse runs as a float Conv between DequantizeLinear and QuantizeLinear.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(_model_for_host(Path(onnx_path)), session_options(options, opt), providers=PROVIDERS)
        graph = onnx.load(str(opt)).graph
    return {n.input[INT8_KERNELS[n.op_type]] for n in graph.node
            if n.op_type in INT8_KERNELS and len(n.input) > INT8_KERNELS[n.op_type]}

