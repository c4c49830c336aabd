"""TensorRT: trtexec command lines per TensorRT version, DLA calibration caches, engine builds.

Engines are specific to the GPU and the TensorRT version (NOTES-quantization), so they are built on
the device. Precision handling follows the TensorRT found there (NOTES-jetson, section 3):
- <= 10.11: explicit Q/DQ INT8 through the weakly typed flags `--int8 --fp16`;
- 10.12 - 10.x: the weak-typing API is deprecated [RN1012], so Q/DQ models build `--stronglyTyped`;
- 11: precision flags, `--calib` and the calibrator API are removed, strong typing is the default and
  `--stronglyTyped` is a no-op [MIG11].
DLA INT8 needs implicit quantization (a calibration cache) [DLA-CN][I2222]; DLA builds exist up to
TensorRT 10.7 on JetPack [TRT11-DLA], so the DLA path is limited to TensorRT <= 10.7.

Its Q/DQ dialect (`to_tensorrt_flavour`, `TensorRTBackend.flavour`): int8 only, zero point 0, per-channel
weights on axis 0, and the residual Add quantized on its identity input instead of on the conv branch, so
conv + add fuse.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeres.check import Finding
from edgeres.errors import EdgeresError, ExportError, TargetError
from edgeres.io import atomic_write, made_by_edgeres, sha256sum
from edgeres.onnxgraph import (
    QDQ,
    Graph,
    GraphView,
    attr,
    is_weight_dq,
    short_tensor_names,
    store_int8_weights,
    zero_point,
)
from edgeres.targets import Target, parse_version

if TYPE_CHECKING:
    import onnx

    from edgeres.backends.base import Artifact, RuntimeOptions

WORKSPACE_FRACTION = 4        # workspace at most 1/4 of the board's memory (CPU and GPU share it on Jetson)
STRONGLY_TYPED_FROM = (10, 12)
LAST_DLA = (10, 7)            # "TensorRT 10.7 was the last release that supported DLA" [TRT11-DLA]
ENGINE_NAME = "model.engine"
BUILD_SETTINGS = "build.json"  # a bundle's BuildSettings: written by edgeres.jetson, read by ensure_engine


def dla_engine_name(core: int) -> str:
    """The engine file a bundle's DLA core `core` builds: model.dla<core>.engine."""
    return f"model.dla{core}.engine"


@dataclass(frozen=True)
class BuildSettings:
    """How a bundle's engine is built (build.json), written at export and read on the device by the same code."""

    target: str
    precision: str
    onnx: str
    input_shape: tuple[int, ...]
    onnx_noqdq: str | None = None  # the Q/DQ-free ONNX the DLA builds from (with the calibration cache)
    calibration_cache: str | None = None
    workspace_mb: int | None = None

    def write(self, bundle: str | os.PathLike) -> Path:
        path = Path(bundle) / BUILD_SETTINGS
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({**asdict(self), "input_shape": list(self.input_shape)}, indent=2) + "\n",
                           encoding="utf-8")
        return path

    @classmethod
    def read(cls, bundle: str | os.PathLike) -> BuildSettings:
        """The bundle's settings; one-line errors for a missing or damaged build.json."""
        path = Path(bundle) / BUILD_SETTINGS
        if not path.is_file():
            raise EdgeresError(f"{bundle} has no {BUILD_SETTINGS}; "
                               "export it with `edgeres export --target jetson` first")
        try:
            d = json.loads(path.read_text())
            return cls(target=str(d["target"]), precision=str(d["precision"]), onnx=str(d["onnx"]),
                       input_shape=tuple(int(v) for v in d.get("input_shape") or ()),
                       onnx_noqdq=d.get("onnx_noqdq"), calibration_cache=d.get("calibration_cache"),
                       workspace_mb=d.get("workspace_mb"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EdgeresError(f"{path} is damaged ({type(exc).__name__}: {exc}); export the bundle again") from exc
# Ops that keep the quantization scale of their input (the Q/DQ-Translator's
# DEFAULT_OPS_TO_INFER_ADJACENT_SCALES, NVIDIA/Deep-Learning-Accelerator-SW tools/qdq-translator,
# without Sigmoid, whose output range differs from its input's).
_SCALE_KEEPING_OPS = {"MaxPool", "Flatten", "Relu", "Pad", "Transpose", "Reshape", "Squeeze", "Unsqueeze"}


def import_tensorrt():
    """Import TensorRT, or raise the one-line error that says where it lives."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EdgeresError("TensorRT not found: run this on the device (JetPack ships it)") from exc
    return tensorrt


def _version(trt_version: str | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(trt_version, tuple):
        return trt_version
    try:
        return parse_version(trt_version)
    except ValueError:
        raise TargetError(f"{trt_version!r} is not a TensorRT version; pass one like 10.3.0") from None


# --- build plan: one source of truth for trtexec, build.sh and the Python builder ----------------------


@dataclass(frozen=True)
class BuildPlan:
    """What a build sets for one TensorRT version, whichever tool runs it."""

    trt_version: tuple[int, ...]
    precision: str
    int8: bool = False
    fp16: bool = False
    strongly_typed: bool = False
    dla_core: int | None = None
    calib_cache: Path | None = None
    workspace_mb: int | None = None


def workspace_cap_mb(target: Target, requested: int | None = None) -> int | None:
    """`requested` capped to a fraction of the board's memory; the cap itself when nothing is asked."""
    if requested is not None and requested <= 0:
        raise TargetError(f"workspace must be a positive number of MiB, got {requested}")
    cap = target.memory_mb // WORKSPACE_FRACTION if target.memory_mb else None
    if requested is None or cap is None:
        return requested if cap is None else cap
    return min(requested, cap)


def plan_build(
    target: Target,
    trt_version: str | tuple[int, ...],
    *,
    precision: str,
    dla_core: int | None = None,
    calib_cache: str | os.PathLike | None = None,
    workspace_mb: int | None = None,
) -> BuildPlan:
    """Decide precision flags, DLA settings and workspace; raise TargetError for builds that cannot work."""
    v = _version(trt_version)
    if target.runtime != "tensorrt":
        raise TargetError(f"target {target.name} runs {target.runtime}, not TensorRT; pick a TensorRT target")
    target.require(precision)
    shown = ".".join(map(str, v))
    int8 = fp16 = strongly = False
    if dla_core is not None:
        _check_dla(target, v, shown, precision, dla_core, calib_cache)
        int8, fp16 = precision == "int8", True   # implicit INT8 with FP16 for the layers the cache lacks
    elif calib_cache is not None:
        raise TargetError("a calibration cache is only for DLA builds; GPU builds take the Q/DQ in the ONNX")
    elif precision == "fp16" and v >= (11,):
        raise TargetError(f"TensorRT {shown} has no FP16 flag (strong typing): export an FP16 ONNX, "
                          "or build int8 from the Q/DQ ONNX")
    elif precision == "fp16":
        fp16 = True
    elif precision == "int8" and v >= (11,):
        pass                                     # strongly typed by default: precision comes from Q/DQ
    elif precision == "int8" and v[:2] >= STRONGLY_TYPED_FROM:
        strongly = True
    elif precision == "int8":
        int8 = fp16 = True
    return BuildPlan(
        trt_version=v, precision=precision, int8=int8, fp16=fp16, strongly_typed=strongly, dla_core=dla_core,
        calib_cache=Path(calib_cache) if calib_cache is not None else None,
        workspace_mb=workspace_cap_mb(target, workspace_mb),
    )


def _check_dla(target: Target, v: tuple[int, ...], shown: str, precision: str, core: int, cache) -> None:
    if not target.has_dla:
        raise TargetError(f"target {target.name} has no DLA; build for the GPU (no DLA core)")
    if not 0 <= core < target.dla_cores:
        raise TargetError(f"DLA core {core} does not exist on {target.name}; use 0..{target.dla_cores - 1}")
    if v[:2] > LAST_DLA:
        raise TargetError(f"TensorRT {shown} has no DLA build path here (10.7 was the last release with DLA "
                          "on JetPack; 11.4.1 DLA is strongly typed FP16 only); build for the GPU")
    if precision == "fp32":
        raise TargetError("the DLA runs fp16 or int8 only; pick one of those or build for the GPU")
    if precision == "int8" and cache is None:
        raise TargetError("DLA INT8 needs a calibration cache (the DLA has no explicit Q/DQ path); "
                          "pass the bundle's calibration.cache with the Q/DQ-free ONNX")


def trtexec_command(
    onnx: str | os.PathLike,
    engine: str | os.PathLike,
    target: Target,
    trt_version: str | tuple[int, ...],
    *,
    precision: str,
    dla_core: int | None = None,
    calib_cache: str | os.PathLike | None = None,
    workspace_mb: int | None = None,
    shapes: str | None = None,
    trtexec: str = "trtexec",
) -> list[str]:
    """The trtexec command line that builds `engine` from `onnx` with the TensorRT found on the device."""
    plan = plan_build(target, trt_version, precision=precision, dla_core=dla_core, calib_cache=calib_cache,
                      workspace_mb=workspace_mb)
    cmd = [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}"]
    if plan.strongly_typed:
        cmd.append("--stronglyTyped")
    if plan.int8:
        cmd.append("--int8")
    if plan.fp16:
        cmd.append("--fp16")
    if plan.int8 and plan.calib_cache is not None:
        cmd.append(f"--calib={plan.calib_cache}")
    if plan.dla_core is not None:
        cmd += [f"--useDLACore={plan.dla_core}", "--allowGPUFallback"]
    if plan.workspace_mb is not None:
        # --workspace (MiB) is the TensorRT 8 flag; 10 replaced it with --memPoolSize.
        ws = plan.workspace_mb
        cmd.append(f"--workspace={ws}" if plan.trt_version < (10,) else f"--memPoolSize=workspace:{ws}M")
    if shapes:
        cmd.append(f"--shapes={shapes}")
    return cmd


# --- calibration cache (DLA implicit INT8) -------------------------------------------------------------
# TensorRT's text format: a header "TRT-<version>-EntropyCalibration2", then one "<tensor>: <hex>"
# line per tensor, where <hex> is the big-endian bits of the float32 scale (amax / 127). Written this
# way by NVIDIA's Q/DQ-Translator (Deep-Learning-Accelerator-SW tools/qdq-translator/utils.py,
# export_to_trt_calib + float_to_hex) and read back with struct.unpack("!f", bytes.fromhex(...)).
# <version> is NV_TENSORRT_VERSION: major*1000 + minor*100 + patch for 8.x (8.5.2 -> 8502,
# NvInferRuntimeBase.h), major*10000 + minor*100 + patch from 10.0 (10.3.0 -> 100300, NvInferVersion.h).
# TensorRT skips a cache it finds incompatible (NVIDIA/TensorRT#1378), so the header must carry the
# version that reads it.


def trt_version_int(trt_version: str | tuple[int, ...]) -> int:
    v = _version(trt_version) + (0, 0)
    major, minor, patch = v[:3]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


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


# --- Q/DQ ONNX -> Q/DQ-free ONNX + scales --------------------------------------------------------------


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

    from edgeres.onnxgraph import GraphView, load

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
    from edgeres.onnxgraph import GraphView, load

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


# --- the Q/DQ dialect TensorRT's explicit quantization wants ---------------------------------------

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


# --- lint: what TensorRT rejects or runs slowly (`edgeres check`, `Backend.lint_rules`) ------------------

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


# --- device identity and engine fingerprints -----------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str
    compute_capability: str
    tensorrt_version: str


def _gpu_from_driver() -> tuple[str, str] | None:
    """GPU name and compute capability from libcuda (present wherever the driver is, Jetson included)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
    if (cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0) or cuda.cuDeviceGetName(name, 256, dev)
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)):
        return None
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


def _gpu_from_torch() -> tuple[str, str] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return p.name, f"{p.major}.{p.minor}"


def detect_device() -> DeviceInfo:
    """TensorRT version, GPU name and compute capability of this machine."""
    trt = import_tensorrt()
    gpu = _gpu_from_driver() or _gpu_from_torch()
    if gpu is None:
        raise EdgeresError("no CUDA GPU found (libcuda did not answer); run this on the device with its GPU")
    return DeviceInfo(gpu_name=gpu[0], compute_capability=gpu[1], tensorrt_version=trt.__version__)


def fingerprint_mismatch(engine_meta: dict[str, Any], device: DeviceInfo) -> list[str]:
    """Why an engine built as `engine_meta` describes cannot run on `device` (empty when it can)."""
    reasons = []
    for key, label in (("tensorrt_version", "TensorRT"), ("compute_capability", "compute capability"),
                       ("gpu_name", "GPU")):
        built, here = engine_meta.get(key), getattr(device, key)
        if built != here:
            reasons.append(f"{label} {built} (engine) vs {here} (here)")
    return reasons


def fingerprint_matches(engine_meta: dict[str, Any], device: DeviceInfo) -> bool:
    return not fingerprint_mismatch(engine_meta, device)


def engine_meta_path(engine: str | os.PathLike) -> Path:
    """`model.engine` -> `model.engine.json`."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def read_engine_meta(engine: str | os.PathLike) -> dict[str, Any] | None:
    path = engine_meta_path(engine)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- engine build and run (need TensorRT and a GPU) ----------------------------------------------------


def build_engine(
    onnx: str | os.PathLike,
    out: str | os.PathLike,
    target: Target,
    *,
    workspace_mb: int | None = None,
    dla_core: int | None = None,
    calib_cache: str | os.PathLike | None = None,
    precision: str | None = None,
) -> Path:
    """Build a serialized engine with the TensorRT Python API; write it and `<engine>.json` atomically."""
    trt = import_tensorrt()
    device = detect_device()
    onnx, out = Path(onnx), Path(out)
    if not onnx.is_file():
        raise ExportError(f"ONNX file {onnx} not found; export the model first")
    precision = precision or target.default_precision
    plan = plan_build(target, trt.__version__, precision=precision, dla_core=dla_core,
                      calib_cache=calib_cache, workspace_mb=workspace_mb)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.trt_version < (10,):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx}: {errors}; run `edgeres check` on it")
    config = builder.create_builder_config()
    if plan.workspace_mb is not None and hasattr(config, "set_memory_pool_limit"):   # TensorRT >= 8.4
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mb << 20)
    elif plan.workspace_mb is not None:
        config.max_workspace_size = plan.workspace_mb << 20
    if plan.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if plan.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        if plan.int8:
            calibrator = _cache_calibrator(trt, plan.calib_cache)   # kept alive until the build ends
            config.int8_calibrator = calibrator
    _add_batch_profile(trt, builder, network, config, target.default_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build {onnx}; rerun with trtexec --verbose")
    with atomic_write(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    meta = {**asdict(device), "onnx": onnx.name, "onnx_sha256": sha256sum(onnx), "target": target.name,
            "precision": precision, "dla_core": dla_core, "workspace_mb": plan.workspace_mb,
            "strongly_typed": plan.strongly_typed}
    with atomic_write(engine_meta_path(out)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _cache_calibrator(trt, cache: Path):
    """An entropy calibrator that only replays `cache` (retargeted to this TensorRT's version)."""
    data = retarget_calibration_cache(Path(cache).read_text(encoding="ascii"), trt.__version__).encode()

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return data

        def write_calibration_cache(self, cache):
            return None

    return CacheCalibrator()


def _add_batch_profile(trt, builder, network, config, batch: int) -> None:
    """Dynamic batch -> one optimization profile with the target's default batch."""
    profile, needed = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise ExportError(f"input {tensor.name} has dynamic dimensions {shape}; export a fixed size")
        if shape and shape[0] < 0:
            rest = shape[1:]
            profile.set_shape(tensor.name, (1, *rest), (batch, *rest), (batch, *rest))
            needed = True
    if needed:
        config.add_optimization_profile(profile)


def ensure_engine(bundle_dir: str | os.PathLike, *, dla_core: int | None = None, log=None) -> Path:
    """The bundle's engine for this device: reuse it when its fingerprint matches, else (re)build it."""
    from edgeres import targets

    log = log or sys.stderr
    bundle = Path(bundle_dir)
    if not (bundle / BUILD_SETTINGS).is_file():
        BuildSettings.read(bundle)  # the one-line error for a missing build.json
    if not made_by_edgeres(bundle, "export"):
        raise EdgeresError(f"{bundle} is not an export folder edgeres made (no manifest.json); "
                           "export it with `edgeres export --target jetson-...`")
    settings = BuildSettings.read(bundle)
    target = targets.load(settings.target)
    if dla_core is None:
        onnx, engine, cache = bundle / settings.onnx, bundle / ENGINE_NAME, None
    else:
        if settings.onnx_noqdq is None:
            raise EdgeresError(f"{bundle} was exported without DLA files; export it again for a board with DLA cores")
        onnx, engine = bundle / settings.onnx_noqdq, bundle / dla_engine_name(dla_core)
        cache = bundle / settings.calibration_cache if settings.calibration_cache else None
    device = detect_device()
    meta = read_engine_meta(engine)
    if engine.is_file() and meta is not None:
        reasons = fingerprint_mismatch(meta, device)
        if meta.get("onnx_sha256") != sha256sum(onnx):
            reasons.append(f"{onnx.name} changed since the build")
        if not reasons:
            return engine
        print(f"{engine.name} does not fit this device ({'; '.join(reasons)}); rebuilding", file=log)
    elif engine.is_file():
        print(f"{engine.name} has no build record; rebuilding", file=log)
    return build_engine(onnx, engine, target, workspace_mb=settings.workspace_mb, dla_core=dla_core,
                        calib_cache=cache, precision=settings.precision)


# --- the Backend -----------------------------------------------------------------------------------------


def _default_precision(onnx: Path, target: Target) -> str:
    """int8 for a Q/DQ model (explicit quantization), else fp16 where the target has it."""
    from edgeres.onnxgraph import load

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in load(onnx).graph.node):
        return "int8"
    return "fp16" if target.supports("fp16") else "fp32"


class _Session:
    """An activated polygraphy TrtRunner and the name of its input."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.input_name = next(iter(runner.get_input_metadata()))

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()

    def __del__(self) -> None:
        self.close()


class TensorRTBackend:
    """Backend contract for TensorRT: compile builds an engine, load deserializes it, run executes it."""

    name = "tensorrt"
    suffix = ".engine"
    reads = (".engine", ".plan")
    custom_domains: frozenset[str] = frozenset()  # standard ONNX only
    lint_rules = TENSORRT_RULES
    precisions = ("fp32", "fp16", "int8")  # the device builds FP32 ONNX as an FP16 engine on request

    def __init__(self, *, precision: str | None = None, workspace_mb: int | None = None,
                 dla_core: int | None = None, calib_cache: str | os.PathLike | None = None) -> None:
        self.precision, self.workspace_mb = precision, workspace_mb
        self.dla_core, self.calib_cache = dla_core, calib_cache

    @property
    def runs_on_host(self) -> bool:
        """TensorRT is installed and a CUDA GPU answers (on the device; never on a plain x86 host)."""
        import importlib.util

        return importlib.util.find_spec("tensorrt") is not None and _gpu_from_driver() is not None

    def flavour(self, qdq):
        """The exporter's symmetric int8 Q/DQ ONNX in this runtime's dialect (`to_tensorrt_flavour`)."""
        return to_tensorrt_flavour(qdq)

    def compile(self, onnx: Path, target: Target, out: Path) -> Artifact:
        from edgeres.backends.base import Artifact

        import_tensorrt()
        onnx, out = Path(onnx), Path(out)
        engine = out / ENGINE_NAME if out.is_dir() or not out.suffix else out
        precision = self.precision or _default_precision(onnx, target)
        build_engine(onnx, engine, target, workspace_mb=self.workspace_mb, dla_core=self.dla_core,
                     calib_cache=self.calib_cache, precision=precision)
        meta = read_engine_meta(engine) or {}
        return Artifact(path=engine, runtime=self.name, precision=precision, meta=meta)

    def open(self, path: Path) -> Artifact:
        """An engine is opaque without TensorRT: `edgeres build` records its precision beside it (else "unknown")."""
        from edgeres.backends.base import Artifact

        path = Path(path)
        meta = read_engine_meta(path)
        precision = meta.get("precision", "unknown") if isinstance(meta, dict) else "unknown"
        return Artifact(path=path, runtime=self.name, precision=str(precision), meta={"bytes": path.stat().st_size})

    def meta_text(self, path: Path) -> tuple[str | None, str]:
        """An engine carries no metadata: the bundle's sidecar beside it holds the record (None without one)."""
        from edgeres.artifact_meta import SIDECAR, sidecar_text

        return sidecar_text(path), f"{SIDECAR} beside it"

    def load(self, artifact: Artifact, options: RuntimeOptions | None = None) -> _Session:
        import_tensorrt()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        path = Path(artifact.path)
        meta = artifact.meta or read_engine_meta(path)
        if meta:
            reasons = fingerprint_mismatch(meta, detect_device())
            if reasons:
                raise EdgeresError(f"{path.name} was built for another device ({'; '.join(reasons)}); "
                                   "rebuild it here with `edgeres build BUNDLE`")
        runner = TrtRunner(EngineFromBytes(path.read_bytes()))
        runner.activate()
        return _Session(runner)

    def run(self, session: _Session, batch: np.ndarray) -> np.ndarray:
        feed = {session.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        outputs = session.runner.infer(feed)
        return np.asarray(next(iter(outputs.values())))
