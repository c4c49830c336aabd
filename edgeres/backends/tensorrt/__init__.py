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

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeres.backends.tensorrt.engine import (
    DeviceInfo,
    build_engine,
    detect_device,
    engine_meta_path,
    ensure_engine,
    fingerprint_matches,
    fingerprint_mismatch,
    gpu_present,
    read_engine_meta,
)
from edgeres.backends.tensorrt.lint import TENSORRT_RULES
from edgeres.backends.tensorrt.plan import (
    BUILD_SETTINGS,
    ENGINE_NAME,
    LAST_DLA,
    STRONGLY_TYPED_FROM,
    BuildPlan,
    BuildSettings,
    dla_engine_name,
    import_tensorrt,
    plan_build,
    trt_version_int,
    trtexec_command,
    workspace_cap_mb,
)
from edgeres.backends.tensorrt.qdq import (
    calibration_cache_header,
    calibration_cache_text,
    read_calibration_cache,
    retarget_calibration_cache,
    scale_hex,
    scales_from_qdq_onnx,
    strip_qdq,
    to_tensorrt_flavour,
    write_calibration_cache,
)
from edgeres.errors import EdgeresError
from edgeres.io import sha256sum
from edgeres.targets import Target

if TYPE_CHECKING:
    from edgeres.backends.base import Artifact, RuntimeOptions

__all__ = [  # the package's face: what bundle code, the CLI's build and the tests use
    "BUILD_SETTINGS", "ENGINE_NAME", "LAST_DLA", "STRONGLY_TYPED_FROM", "TENSORRT_RULES", "BuildPlan", "BuildSettings",
    "DeviceInfo", "TensorRTBackend", "build_engine", "calibration_cache_header", "calibration_cache_text",
    "detect_device", "dla_engine_name", "engine_meta_path", "ensure_engine", "fingerprint_matches",
    "fingerprint_mismatch", "import_tensorrt", "plan_build", "read_calibration_cache", "read_engine_meta",
    "retarget_calibration_cache", "scale_hex", "scales_from_qdq_onnx", "sha256sum", "strip_qdq",
    "to_tensorrt_flavour", "trt_version_int", "trtexec_command", "workspace_cap_mb", "write_calibration_cache",
]


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
    fallback_precision = "fp16"  # a layer kept out of INT8 (--max-drop) is typed FP16 in the ONNX
    reads = (".engine", ".plan")
    qdq_flavour = "tensorrt"  # what a target's `qdq_flavour` names for this dialect
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

        return importlib.util.find_spec("tensorrt") is not None and gpu_present()

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

    def bundle_extras(self, folder: Path, target: Target, *, onnx_name: str, precision: str,
                      input_shape: tuple[int, ...], meta, images: Callable[[], np.ndarray]) -> dict:
        """The device half of the bundle beside the ONNX: the TensorRT lint (errors stop the export), build.sh,
        build.json, the DLA cache, README and the stand-alone runner with golden outputs chosen from `images()`."""
        from edgeres.backends.tensorrt.bundle import golden_set, write_bundle_extras
        from edgeres.check import check_onnx

        lint = check_onnx(folder / onnx_name, target)
        lint.raise_for_errors(onnx_name)
        golden = golden_set(folder / onnx_name, images(), precision=precision)
        written = write_bundle_extras(folder, target, onnx_name=onnx_name, precision=precision,
                                      input_shape=input_shape, meta=meta, golden=golden)
        return {"tensorrt_lint": lint.to_dict(), "bundle_files": sorted(p.name for p in written),
                "compute_capability": target.compute_capability,
                "tensorrt_versions": list(target.tensorrt.versions()) if target.tensorrt else []}

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

    def peak_memory(self, artifact: Artifact, *, batch: int, input_shape: tuple[int, ...],
                    options: RuntimeOptions | None = None):
        """Not measured: an engine's activations live in CUDA device memory, which the resident-set probe
        (peakmem) need not see, and no device has checked it against the estimate."""
        raise EdgeresError("edgeres does not measure TensorRT's peak memory (CUDA device memory, not this "
                           "process's resident set); use the estimate (edgeres.memory)")
