"""TensorRT engines on the device: the device's identity, engine fingerprints and build records, building an
engine from a bundle (`ensure_engine`). Needs TensorRT and a GPU."""

from __future__ import annotations

import ctypes
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeres.backends.tensorrt.plan import (
    BUILD_SETTINGS,
    ENGINE_NAME,
    BuildSettings,
    dla_engine_name,
    import_tensorrt,
    plan_build,
)
from edgeres.backends.tensorrt.qdq import retarget_calibration_cache
from edgeres.errors import EdgeresError, ExportError
from edgeres.io import atomic_write, made_by_edgeres, output_lock, sha256sum
from edgeres.targets import Target

if TYPE_CHECKING:

    pass


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


def gpu_present() -> bool:
    """A CUDA GPU answers through its driver (libcuda)."""
    return _gpu_from_driver() is not None


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
    with output_lock(engine):  # one build per engine: a second `edgeres build` stops, naming this one
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
