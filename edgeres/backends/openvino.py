"""OpenVINO on x86 CPUs: the Q/DQ ONNX becomes OpenVINO IR (model.xml + model.bin) with int8 weights.

`ov.convert_model` turns each QuantizeLinear/DequantizeLinear pair into a FakeQuantize; the CPU plugin
fuses those into int8 convolutions (residual add and ReLU included) and folds weight FakeQuantizes into
int8 constants, so the .bin of an INT8 model is about a quarter of the FP32 one. The OpenVINO flavour
(`to_openvino_flavour`, `OpenVINOBackend.flavour`) of the quantized model that also serves ONNX Runtime
fuses the way NNCF's own OpenVINO quantization does, pre-activation BNs included; the CPU flavour's file loads too.

Precision is stated, never guessed: on CPUs with AMX or AVX512-BF16 the plugin runs "FP32" models in
bf16 unless told otherwise, so every model loads with INFERENCE_PRECISION_HINT f32 (for INT8 models
that keeps the unquantized layers in true FP32), and `describe_precision` reports what the plugin
actually executes, layer by layer.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeres.artifact_meta import KEY as META_KEY
from edgeres.artifact_meta import onnx_meta_text
from edgeres.backends.base import Artifact, RuntimeOptions
from edgeres.coverage import Coverage
from edgeres.errors import ExportError, TargetError
from edgeres.fallback import node_module
from edgeres.io import sha256sum
from edgeres.onnxgraph import (
    Graph,
    activation_qdq,
    attr,
    clear_value_info,
    drop_dead_nodes,
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

DEVICE = "CPU"
INSTALL_HINT = "OpenVINO is not installed: pip install 'edgeres[openvino]'"
INFERENCE_PRECISION = "f32"  # never let the plugin pick bf16/fp16 for layers the model says are FP32
# runtimePrecision of a runtime-graph layer -> the precision edgeres reports
_PRECISION_NAMES = {"i8": "int8", "u8": "int8", "f32": "fp32", "bf16": "bf16", "f16": "fp16"}
_NOT_COMPUTE = {"Const", "Input", "Output", "Parameter", "Result"}


def import_openvino():
    """Import OpenVINO, or raise the one-line TargetError that says how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise TargetError(INSTALL_HINT) from exc
    return openvino


def bin_path(xml: str | os.PathLike) -> Path:
    """The weights file that belongs to an IR .xml."""
    return Path(xml).with_suffix(".bin")


def ir_bytes(xml: str | os.PathLike) -> int:
    """Size of an IR on disk: the .xml plus its .bin."""
    xml = Path(xml)
    return xml.stat().st_size + (bin_path(xml).stat().st_size if bin_path(xml).is_file() else 0)


def compile_config(options: RuntimeOptions | None = None) -> dict[str, Any]:
    """CPU plugin settings: true-FP32 non-quantized layers, latency mode, and the thread count if given."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION, "PERFORMANCE_HINT": "LATENCY"}
    if options is not None and options.threads:
        config["INFERENCE_NUM_THREADS"] = int(options.threads)
    return config


def constant_bytes(model) -> dict[str, int]:
    """Bytes of the model's constants by element type, e.g. {"i8": 268336, "f32": 6072} for an INT8 ResNet-20."""
    out: collections.Counter = collections.Counter()
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            out[op.get_output_element_type(0).get_type_name()] += op.get_byte_size()
    return dict(out)


def precision_of(model) -> str:
    """"int8" when the IR holds FakeQuantize ops or int8 weights, else "fp32" (IR constants stay FP32 here)."""
    if any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()):
        return "int8"
    consts = constant_bytes(model)
    return "int8" if consts.get("i8", 0) + consts.get("u8", 0) > consts.get("f32", 0) else "fp32"


def read_ir(xml: str | os.PathLike):
    """The IR at `xml` (with its .bin); ExportError (one line) for a missing .bin or a corrupt or foreign file."""
    xml = Path(xml)
    if not bin_path(xml).is_file():
        raise ExportError(f"{bin_path(xml).name} is missing beside {xml.name}; copy the .xml and .bin together")
    try:  # the weights path pins the IR reader, so no other frontend guesses at a foreign file
        return import_openvino().Core().read_model(str(xml), str(bin_path(xml)))
    except RuntimeError as exc:
        raise ExportError(f"{xml} is not a readable OpenVINO IR ({_first_reason(exc)}); export it again") from exc


def _first_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return (lines[0] if lines else type(exc).__name__)[:160]


def ir_precision(xml: str | os.PathLike) -> str:
    """`precision_of` for an IR on disk (for `edgeres bench model.xml` without a manifest)."""
    return precision_of(read_ir(xml))


def ir_meta_text(xml: str | os.PathLike) -> str | None:
    """The edgeres metadata record (JSON) in an IR's rt_info, or None when it has none."""
    try:
        model = import_openvino().Core().read_model(str(xml))
    except Exception as exc:  # noqa: BLE001  (OpenVINO raises its own exception types)
        raise ExportError(f"OpenVINO cannot read {xml} ({str(exc).splitlines()[0][:120]}); keep its .bin beside "
                          "it, or re-export it") from exc
    return model.get_rt_info(META_KEY).astype(str) if model.has_rt_info(META_KEY) else None


# --- the Q/DQ dialect OpenVINO fuses best ------------------------------------------------------------

def to_openvino_flavour(onnx_model):
    """Q/DQ layout for OpenVINO on CPU: NNCF's own OpenVINO convention, uint8 after ReLU, int8 elsewhere.

    Post-ReLU int8 zp 0 -> uint8 zp 0 with the same scale (lossless); other activations stay symmetric int8
    and biases stay FP32, so `ov.convert_model` yields one FakeQuantize per pair, fused into int8 kernels,
    and a smaller IR than the CPU flavour (whose int32 biases and uint8 zp-128 shifts add layers). BNs that
    were quantized as depthwise convs go back to Mul/Add for OpenVINO to fuse (`bn_convs_as_affine`).
    """
    model = store_int8_weights(onnx_model)
    gr = Graph(model)
    nonneg = nonnegative(gr)
    for q, dqs in list(activation_qdq(gr)):
        zp = zero_point(gr, q)
        if zp.dtype != np.int8 or q.input[0] not in nonneg:
            continue
        if np.any(zp != 0):
            raise ExportError(f"QuantizeLinear {q.name!r} has a non-zero int8 zero point; expected symmetric int8")
        retype(gr, q, dqs, np.zeros(zp.shape, np.uint8))
    gr.prune_unused()
    bn_convs_as_affine(gr)
    return short_tensor_names(model)


def _bn_conv(gr: Graph, conv) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) of a depthwise 1x1 conv that stands for a BN (fold_bn's bn_as_depthwise), else None."""
    if conv.op_type != "Conv" or len(conv.input) < 2:
        return None
    wdq = gr.producer.get(conv.input[1])
    if wdq is None or not is_weight_dq(gr, wdq) or np.any(zero_point(gr, wdq) != 0):
        return None
    w, w_scale = gr.const(wdq.input[0]), gr.const(wdq.input[1])
    channels = w.shape[0]
    if w.shape[1:] != (1, 1, 1) or attr(conv, "group", 1) != channels:
        return None
    if any(v != 1 for v in attr(conv, "strides", [1])) or any(v != 0 for v in attr(conv, "pads", [0])):
        return None
    bias = gr.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(channels, np.float32)
    if bias is None:
        return None
    scale = w.reshape(channels).astype(np.float32) * np.broadcast_to(w_scale.astype(np.float32), (channels,))
    return scale, bias.astype(np.float32)


def bn_convs_as_affine(gr: Graph) -> int:
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
        clear_value_info(gr.model, {conv.output[0]})
        gr.refresh()
        changed += 1
    drop_dead_nodes(gr)
    gr.prune_unused()
    return changed


def _rt(op, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def describe_precision(compiled) -> dict[str, Any]:
    """What the CPU plugin executes: its precision hint and the compute layers of the runtime graph by precision.

    Layers fed only by constants (scale reshapes folded at load) and layout-free bookkeeping (inputs, outputs,
    constants) are not counted. Example: {"inference_precision_hint": "f32", "int8_ops": 27, "fp32_ops": 1,
    "bf16_ops": 0, "fp16_ops": 0, "other_ops": 0, "layers": {"Convolution": {"int8": 19}, ...}}.
    """
    counts: collections.Counter = collections.Counter()
    layers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    constant: set[str] = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        kind = _rt(op, "layerType")
        name = op.get_friendly_name()
        inputs = [i.get_source_output().get_node().get_friendly_name() for i in op.inputs()]
        if kind == "Const" or (inputs and all(i in constant for i in inputs)):
            constant.add(name)
            continue
        if kind in _NOT_COMPUTE:
            continue
        precision = _PRECISION_NAMES.get(_rt(op, "runtimePrecision"), "other")
        counts[precision] += 1
        layers[kind][precision] += 1
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return {
        "inference_precision_hint": _type_name(hint),
        **{f"{p}_ops": counts.get(p, 0) for p in ("int8", "fp32", "bf16", "fp16", "other")},
        "layers": {k: dict(v) for k, v in sorted(layers.items())},
    }


def _type_name(value) -> str:
    """openvino Type (f32, bf16, ...) or a string property as its short name."""
    get = getattr(value, "get_type_name", None)
    return get() if get is not None else str(value)


def _save_ir(ov, model, out: Path, check: Callable[[Path], Any]) -> Any:
    """Write out (.xml) and its .bin so neither appears half-written or unchecked: stage both in a temp dir,
    run `check` on the staged .xml, then move the .bin and last the .xml into place. Returns what `check` returns."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".tmp", dir=out.parent))
    try:
        staged = tmp / out.name
        ov.save_model(model, str(staged), compress_to_fp16=False)  # FP32 stays FP32; int8 weights stay int8
        checked = check(staged)
        for path in (bin_path(staged), staged):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(bin_path(staged), bin_path(out))
        os.replace(staged, out)
        return checked
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class OpenVINOSession:
    """A compiled model with one reusable infer request, and what precision it runs in."""

    compiled: Any
    request: Any
    precision: dict = field(default_factory=dict)


class OpenVINOBackend:
    """OpenVINO CPU plugin; artifacts are IR pairs (model.xml + model.bin)."""

    name = "openvino"
    reads = (".xml",)
    qdq_flavour = "openvino"  # what a target's `qdq_flavour` names for this dialect
    custom_domains = frozenset({"org.openvinotoolkit"})
    lint_rules = ()
    precisions = ("fp32", "int8")  # what its artifacts can run as
    suffix = ".xml"  # with its .bin beside it
    fallback_precision = "fp32"  # what a layer kept out of INT8 runs in (--max-drop)

    def __init__(self) -> None:
        self._ov = import_openvino()  # fail at get_backend("openvino"), before any long calibration
        self._core = None

    @property
    def runs_on_host(self) -> bool:
        """OpenVINO is installed (the constructor checked) and its CPU plugin sees this CPU."""
        return DEVICE in self.core.available_devices

    @property
    def core(self):
        if self._core is None:
            self._core = self._ov.Core()
        return self._core

    def flavour(self, qdq):
        """The exporter's symmetric int8 Q/DQ ONNX in this runtime's dialect (`to_openvino_flavour`)."""
        return to_openvino_flavour(qdq)

    def compile(self, onnx: Path, target: Target, out: Path) -> Artifact:
        """Convert `onnx` (FP32 or Q/DQ) to IR at `out` (.xml; the .bin lands beside it) and check it loads."""
        onnx, out = Path(onnx), Path(out)
        if out.suffix != ".xml":
            raise ExportError(f"an OpenVINO artifact is an .xml file (with its .bin beside it), got {out.name}")
        try:
            model = self._ov.convert_model(str(onnx))
        except Exception as exc:  # noqa: BLE001  (the converter raises its own exception types)
            raise ExportError(f"OpenVINO cannot convert {onnx}: {exc}; re-export the model") from exc
        precision = precision_of(model)
        meta = onnx_meta_text(onnx)
        if meta is not None:  # the IR describes itself as its ONNX did
            model.set_rt_info(meta, META_KEY)

        def check(xml: Path) -> dict:
            described = describe_precision(self.core.compile_model(str(xml), DEVICE, compile_config()))
            if precision == "int8" and described["int8_ops"] == 0:
                raise ExportError(f"OpenVINO runs no layer of {onnx.name} in int8; re-export it with Q/DQ (--int8)")
            return described

        described = _save_ir(self._ov, model, out, check)
        meta = {
            "target": getattr(target, "name", None),
            "bytes": ir_bytes(out),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256sum(p)} for p in (out, bin_path(out))},
            "constant_bytes": constant_bytes(model),
            "execution": described,
            "openvino": self._ov.get_version(),
        }
        return Artifact(path=out, runtime=self.name, precision=precision, meta=meta)

    def open(self, path: Path) -> Artifact:
        """An IR on disk: its precision from its ops and constants, its bytes the .xml plus the .bin."""
        path = Path(path)
        return Artifact(path=path, runtime=self.name, precision=ir_precision(path), meta={"bytes": ir_bytes(path)})

    def meta_text(self, path: Path) -> tuple[str | None, str]:
        """The edgeres metadata record in the IR's rt_info (None without one), and where it was looked for."""
        return ir_meta_text(path), "its rt_info"

    def bundle_extras(self, folder: Path, target, **facts) -> dict:
        """Nothing beside the artifact: it stands alone."""
        return {}

    def load(self, artifact: Artifact, options: RuntimeOptions | None = None) -> OpenVINOSession:
        if options is not None and options.device not in (None, "cpu"):
            raise ExportError(f"the openvino backend runs on the CPU only, got device {options.device!r}")
        xml = Path(artifact.path)
        if not bin_path(xml).is_file():
            raise ExportError(f"{bin_path(xml).name} is missing beside {xml.name}; copy the .xml and .bin together")
        try:
            compiled = self.core.compile_model(read_ir(xml), DEVICE, compile_config(options))
        except RuntimeError as exc:
            raise ExportError(f"OpenVINO cannot compile {xml} ({_first_reason(exc)}); export it again") from exc
        return OpenVINOSession(compiled, compiled.create_infer_request(), describe_precision(compiled))

    def int8_coverage(self, artifact: Artifact, session: OpenVINOSession, layers=None) -> Coverage:
        """INT8 share of MACs from the compiled model's runtime precisions (coverage.Coverage).

        `layers` (fallback.all_layers of the ONNX the IR came from) give the PyTorch module names.
        """
        by_node = {layer.node: layer for layer in layers or []}
        ran = runtime_layers(session.compiled)
        total = sum(r["macs"] for r in ran)
        int8_macs = sum(r["macs"] for r in ran if r["int8"])

        def name(r: dict) -> str:
            known = [by_node[n].module for n in r["names"] if n in by_node]
            return known[0] if known else node_module(r["names"][0].removesuffix("/WithoutBiases"))

        return Coverage(int8_mac_share=round(int8_macs / total, 4) if total else 0.0,
                        int8_layers=sum(r["int8"] for r in ran), layers=len(ran),
                        source="measured: OpenVINO CPU plugin runtime precisions",
                        float_layers=[name(r) for r in ran if not r["int8"]])

    def run(self, session: OpenVINOSession, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return session.request.infer({0: x}, share_inputs=True)[0]

    def peak_memory(self, artifact: Artifact, *, batch: int, input_shape: tuple[int, ...],
                    options: RuntimeOptions | None = None) -> PeakMemory:
        """The rise of this process's peak RSS during the first inference of a freshly loaded model at `batch`,
        the median over three loads (memory.measure_peak calls it in a fresh process). The CPU plugin allocates
        its activation memory at a request's first inference and keeps it: later inferences rise by nothing."""
        x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
        runs = []
        for _ in range(3):
            session = self.load(artifact, options)
            runs.append(peak_rise(lambda s=session: self.run(s, x)))
            del session
        settings = {"measured": "first inference of a freshly loaded model", **compile_config(options)}
        return summarize(self.name, batch, runs, settings)


_MAC_LAYERS = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul"}


def runtime_layers(compiled) -> list[dict]:
    """Conv/FC layers of the graph the CPU plugin runs: original ONNX node names, MACs per image, precision.

    MACs come from the runtime shapes (output elements x weight elements per output channel); a layer runs
    in int8 when its runtime precision is i8/u8, the plugin's own record of the kernel it picked.
    """
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        if _rt(op, "layerType") not in _MAC_LAYERS or op.get_input_size() < 2:
            continue
        y, w = op.output(0).get_partial_shape(), op.input(1).get_partial_shape()
        if y.is_dynamic and any(d.is_dynamic for d in list(y)[1:]) or w.is_dynamic:
            continue
        out_elems = math.prod(d.get_length() for d in list(y)[1:])
        w_dims = [d.get_length() for d in w]
        per_out = math.prod(w_dims[1:]) if len(w_dims) > 1 else 1
        macs = out_elems * per_out if _rt(op, "layerType") != "FullyConnected" else math.prod(w_dims)
        out.append({"names": [n for n in _rt(op, "originalLayersNames").split(",") if n] or [op.get_friendly_name()],
                    "macs": int(macs), "int8": _PRECISION_NAMES.get(_rt(op, "runtimePrecision")) == "int8"})
    return out
