"""TensorRT build plans: what a build sets for one TensorRT version (trtexec flags, build.sh, the Python
builder share it), the bundle's build settings record (build.json) and the engine file names."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeres.errors import EdgeresError, TargetError
from edgeres.io import atomic_write
from edgeres.targets import Target, parse_version

if TYPE_CHECKING:

    pass


WORKSPACE_FRACTION = 4        # workspace at most 1/4 of the board's memory (CPU and GPU share it on Jetson)


STRONGLY_TYPED_FROM = (10, 12)


LAST_DLA = (10, 7)            # "TensorRT 10.7 was the last release that supported DLA" [TRT11-DLA]


ENGINE_NAME = "model.engine"


BUILD_SETTINGS = "build.json"  # a bundle's BuildSettings: written by bundle.py, read by engine.ensure_engine


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


def trt_version_int(trt_version: str | tuple[int, ...]) -> int:
    v = _version(trt_version) + (0, 0)
    major, minor, patch = v[:3]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch
