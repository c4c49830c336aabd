"""ONNX Runtime on CPU: the flavoured ONNX file is the artifact; ORT fuses Q/DQ into QLinear* at load.

The CPU-flavour file already holds int8 weights, so it is as small as ORT's own optimized model;
ORT's fully optimized graph is machine-specific (NCHWc layouts), so it is built at load time, not shipped.
"""

from __future__ import annotations

import collections
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeres.backends.base import Artifact, RuntimeOptions
from edgeres.errors import ExportError
from edgeres.hostcpu import has_amx_int8
from edgeres.io import atomic_write, sha256sum

if TYPE_CHECKING:
    from edgeres.targets import Target

PROVIDERS = ["CPUExecutionProvider"]


def _session_options(options: RuntimeOptions | None, optimized_path: Path | None = None):
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
    """The file as is, or on AMX CPUs with wide convs routed to ORT's AMX kernels (export.amx_conv_weights)."""
    from edgeres.check import load_model
    from edgeres.export import amx_conv_weights

    if not has_amx_int8():
        return str(onnx_path)
    model, changed = amx_conv_weights(load_model(onnx_path))
    return model.SerializeToString() if changed else str(onnx_path)


def precision_of(onnx_path: Path) -> str:
    """"int8" when the graph holds QuantizeLinear/DequantizeLinear, "fp16" for FP16 weights, else "fp32"."""
    import onnx

    from edgeres.check import load_model

    model = load_model(onnx_path, load_external_data=False)  # one-line error for a corrupt or empty file
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
        ort.InferenceSession(_model_for_host(Path(onnx_path)), _session_options(options, opt), providers=PROVIDERS)
        return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


class OrtBackend:
    """ONNX Runtime CPU execution provider."""

    name = "onnxruntime"
    suffix = ".onnx"

    @property
    def runs_on_host(self) -> bool:
        """The CPU execution provider runs wherever ONNX Runtime is installed."""
        return importlib.util.find_spec("onnxruntime") is not None

    def flavour(self, qdq):
        """The exporter's symmetric int8 Q/DQ ONNX in this runtime's dialect (`export.to_cpu_flavour`)."""
        from edgeres.export import to_cpu_flavour

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

    def load(self, artifact: Artifact, options: RuntimeOptions | None = None):
        import onnxruntime as ort

        if options is not None and options.device not in (None, "cpu"):
            raise ExportError(f"the onnxruntime backend runs on the CPU only, got device {options.device!r}")
        model = _model_for_host(artifact.path)
        try:
            return ort.InferenceSession(model, _session_options(options), providers=PROVIDERS)
        except Exception as exc:  # noqa: BLE001  (ORT raises its own types: InvalidProtobuf, InvalidGraph, Fail...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ExportError(f"ONNX Runtime cannot load {artifact.path} ({first}); export it again") from exc

    def run(self, session, batch: np.ndarray) -> np.ndarray:
        name = session.get_inputs()[0].name
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
