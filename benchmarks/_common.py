"""What the benchmark scripts share: models and data, calibration, INT8 files written by the library, ORT graph
summaries, interleaved timing rounds, and the machine and versions a result was taken on.

Each script imports this module and never another script. INT8 files are written by the library's own
`export.export_int8` with the target backend's flavour, so the benchmarks time exactly what edgeres ships.
"""

from __future__ import annotations

import collections
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeres.latency import LatencyStats

PRETRAINED = {"resnet20": "resnet20.cifar10_akamaster"}
SETTLE_S = 0.02

Runner = Callable[[np.ndarray], np.ndarray]


def info(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cifar_root(data: str | None) -> Path | None:
    root = data or os.environ.get("EDGERES_DATA")
    return Path(root) if root and (Path(root) / "cifar-10-batches-py").is_dir() else None


def load_split(split: str, n: int, data: str | None = None):
    """n class-balanced real CIFAR-10 images of `split`, or None when no local copy exists (never downloads)."""
    from edgeres import data as edata

    root = _cifar_root(data)
    if root is None:
        return None
    return edata.subset(edata.load_dataset(root, split), n, seed=0)


def fp32_model(name: str, weights: str | None = None) -> tuple[nn.Module, str]:
    """The FP32 model in eval mode and a note on where its weights come from."""
    from edgeres import models
    from edgeres.checkpoint import load_model
    from edgeres.errors import EdgeresError

    if weights:
        return load_model(name, weights).eval(), f"checkpoint {weights}"
    if name in PRETRAINED:
        try:
            return load_model(PRETRAINED[name]).eval(), f"pretrained {PRETRAINED[name]}"
        except EdgeresError as exc:
            info(f"{name}: pretrained weights unavailable ({exc}); using random init")
    torch.manual_seed(0)
    return models.create(name).eval(), "random init (latency does not depend on weight values)"


def calibration_set(model: nn.Module, n: int, data: str | None = None) -> tuple[list[torch.Tensor], str]:
    """Normalised calibration batches (the pipeline's selection, n images) and where they come from."""
    from edgeres import data as edata
    from edgeres.calibration import calibration_batches, load_calibration

    spec = load_calibration("default", size=n)
    root = _cifar_root(data)
    if root is not None:
        ds, note = edata.load_dataset(root, spec.split), f"{n} CIFAR-10 {spec.split} images (class-balanced)"
    else:
        ds = edata.synthetic(max(n, 256), size=model.cfg.input_size, split=spec.split)
        note = f"{n} synthetic images (no CIFAR-10 found)"
    return calibration_batches(spec, ds, model.cfg.mean, model.cfg.std), note


def write_int8_onnx(qmodel: nn.Module, path: Path, input_size: int, *, amx: bool = False,
                    openvino: Path | None = None) -> tuple[Path, dict]:
    """The pipeline's CPU INT8 file: `export.export_int8` with ONNX Runtime's flavour; then, if asked, ORT's
    AMX weight rewrite (what backends/ort.py applies at load on AMX hosts). With `openvino`, also the OpenVINO
    flavour of the same model there (what `--target cpu-openvino` ships)."""
    import onnx

    from edgeres.backends.base import get_backend
    from edgeres.backends.ort import amx_conv_weights
    from edgeres.compress.quantize import strip
    from edgeres.export import export_int8, save_onnx

    stripped = strip(qmodel, torch.zeros(1, 3, input_size, input_size))
    export_int8(stripped, path, get_backend("onnxruntime"), input_size=input_size)
    if openvino is not None:
        export_int8(stripped, openvino, get_backend("openvino"), input_size=input_size)
    applied = {}
    if amx:
        model, applied["amx_convs"] = amx_conv_weights(onnx.load(str(path)))
        save_onnx(model, path)
    return path, applied


def optimized_graph(onnx_path: Path, threads: int | None = None):
    """The graph ONNX Runtime runs after all its optimizations (Q/DQ fusion, NHWC, NCHWc)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath).graph


def fp32_islands(graph) -> list[str]:
    """Op runs between a DequantizeLinear (or the graph input) and a QuantizeLinear, e.g. 'DQ Add BatchNorm... Q'."""
    producer = {o: n for n in graph.node for o in n.output}
    islands = []
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        chain, node = [], producer.get(q.input[0])
        while node is not None and node.op_type != "DequantizeLinear" and not node.op_type.startswith("QLinear"):
            chain.append(node.op_type)
            node = producer.get(node.input[0]) if node.input else None
        if chain:
            islands.append(" ".join(["DQ", *reversed(chain), "Q"]))
    return islands


def graph_summary(onnx_path: Path, threads: int | None = None) -> dict:
    """Op types ORT runs, how many are QLinear/QGemm, Transposes, and the FP32 islands between DQ and Q."""
    graph = optimized_graph(onnx_path, threads)
    ops = collections.Counter(n.op_type for n in graph.node)
    return {
        "op_types": dict(ops.most_common()),
        "quantized_ops": sum(v for k, v in ops.items() if k.startswith("QLinear") or k == "QGemm"),
        "transposes": ops.get("Transpose", 0),
        "fp32_islands": dict(collections.Counter(fp32_islands(graph)).most_common()),
    }


# ---------------------------------------------------------------- engines


@dataclass
class Engine:
    """One way of running the model: a batch -> logits callable plus what it is."""

    key: str
    label: str
    precision: str
    run: Runner
    build_s: float
    size_mb: float | None = None
    details: dict = field(default_factory=dict)


def _ort_session(path: Path, threads: int):
    """A plain ORT session on `path` (no edgeres load-time rewrite), with the library's session settings."""
    import onnxruntime as ort

    from edgeres.backends.base import RuntimeOptions
    from edgeres.backends.ort import PROVIDERS, session_options

    return ort.InferenceSession(str(path), session_options(RuntimeOptions(threads=threads)), providers=PROVIDERS)


def _ort_engine(key: str, label: str, precision: str, path: Path, threads: int, started: float,
                edgeres_backend: bool = False) -> Engine:
    """An ORT session on `path`: ORT's defaults (all optimizations), or edgeres's OrtBackend.load for its files."""

    if edgeres_backend:
        from edgeres.backends.base import RuntimeOptions, open_artifact
        from edgeres.backends.ort import OrtBackend

        session = OrtBackend().load(open_artifact(path), RuntimeOptions(threads=threads))
    else:
        session = _ort_session(path, threads)
    name = session.get_inputs()[0].name
    details = graph_summary(path, threads) if precision == "int8" else {}
    return Engine(key, label, precision, lambda a: session.run(None, {name: a})[0], time.perf_counter() - started,
                  round(path.stat().st_size / 1e6, 4), details)


def torch_engine(model: nn.Module) -> Engine:
    def run(a: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(a)).numpy()

    return Engine("torch_fp32", "PyTorch eager FP32", "fp32", run, 0.0,
                  details={"torch_threads": torch.get_num_threads()})


def ort_fp32_engine(model: nn.Module, work: Path, threads: int) -> tuple[Engine, Path]:
    from edgeres.export import export_onnx

    t0 = time.perf_counter()
    path = export_onnx(model, work / "fp32.onnx", input_size=model.cfg.input_size)
    return _ort_engine("ort_fp32", "ORT FP32", "fp32", path, threads, t0), path


def edgeres_int8_engine(model: nn.Module, calib: list[torch.Tensor], work: Path, threads: int) -> Engine:
    """The pipeline's INT8 file, run by edgeres's ORT backend."""

    from edgeres.compress.quantize import ptq

    t0 = time.perf_counter()
    size = model.cfg.input_size
    example = torch.zeros(1, 3, size, size)
    path, _ = write_int8_onnx(ptq(model, calib, example_input=example), work / "edgeres_int8.onnx", size,
                              openvino=work / "edgeres_int8_openvino.onnx")
    return _ort_engine("edgeres_int8", "edgeres INT8", "int8", path, threads, t0, edgeres_backend=True)


def ort_quantize_static_engine(fp32_onnx: Path, calib: list[torch.Tensor], work: Path, threads: int) -> Engine:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input": b.numpy()} for b in calib])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    t0 = time.perf_counter()
    pre, out = work / "ort_pre.onnx", work / "ort_qs_int8.onnx"
    quant_pre_process(str(fp32_onnx), str(pre))
    reader = Reader()
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return _ort_engine("ort_qs_int8", "ORT quantize_static INT8", "int8", out, threads, t0)


class _OpenVinoRunner:
    """One compiled model (static shape) per batch size, compiled on first use; calls go through an infer request."""

    def __init__(self, model, size: int, config: dict) -> None:
        import openvino as ov

        self.core, self.model, self.size, self.config = ov.Core(), model, size, config
        self.requests: dict[int, object] = {}
        self.compiled: dict[int, object] = {}

    def compile(self, batch: int):
        if batch not in self.compiled:
            model = self.model.clone()
            model.reshape([batch, 3, self.size, self.size])
            self.compiled[batch] = self.core.compile_model(model, "CPU", self.config)
            self.requests[batch] = self.compiled[batch].create_infer_request()
        return self.compiled[batch]

    def __call__(self, a: np.ndarray) -> np.ndarray:
        self.compile(a.shape[0])
        return self.requests[a.shape[0]].infer({0: a}, share_inputs=True)[0]


def _openvino_precisions(compiled) -> dict:
    """Runtime precision of the compute layers OpenVINO actually runs, e.g. {"Convolution": {"u8": 15}}."""
    out: dict[str, dict[str, int]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = str(info["layerType"].astype(str))
        if kind in ("Convolution", "FullyConnected", "Eltwise", "Subgraph", "Reduce", "Pooling", "MatMul"):
            prec = str(info["runtimePrecision"].astype(str))
            out.setdefault(kind, {})
            out[kind][prec] = out[kind].get(prec, 0) + 1
    return out


def _openvino_config(threads: int) -> dict:
    """The CPU plugin settings `--target cpu-openvino` ships with (backends/openvino.compile_config)."""
    from edgeres.backends.base import RuntimeOptions
    from edgeres.backends.openvino import compile_config

    return compile_config(RuntimeOptions(threads=threads))


def openvino_int8_engine(fp32_onnx: Path, calib: list[torch.Tensor], size: int, threads: int) -> Engine:
    import nncf
    import openvino as ov

    t0 = time.perf_counter()
    qmodel = nncf.quantize(ov.convert_model(str(fp32_onnx)), nncf.Dataset([b.numpy() for b in calib]),
                           subset_size=len(calib))
    return _openvino_engine("openvino_int8", "OpenVINO INT8 (NNCF)", qmodel, size, threads, t0)


def edgeres_on_openvino_engine(int8_onnx: Path, size: int, threads: int) -> Engine:
    """edgeres's OpenVINO-flavoured INT8 file (what --target cpu-openvino converts to IR), compiled by OpenVINO."""
    import openvino as ov

    t0 = time.perf_counter()
    return _openvino_engine("edgeres_int8_openvino", "edgeres INT8, OpenVINO target", ov.convert_model(str(int8_onnx)),
                            size, threads, t0)


def _openvino_engine(key: str, label: str, model, size: int, threads: int, started: float) -> Engine:
    import openvino as ov

    runner = _OpenVinoRunner(model, size, _openvino_config(threads))
    compiled = runner.compile(1)
    details = {
        "inference_precision_hint": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
        "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "runtime_precisions": _openvino_precisions(compiled),
        "cpu_capabilities": list(runner.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "openvino": ov.__version__,
    }
    return Engine(key, label, "int8", runner, time.perf_counter() - started, details=details)


# ---------------------------------------------------------------- measurement


def _stats(batch: int, seconds: list[float]) -> LatencyStats:
    ms = np.asarray(seconds) * 1e3
    return LatencyStats(
        batch=batch, runs=len(ms),
        p50_ms=round(float(np.percentile(ms, 50)), 4), p90_ms=round(float(np.percentile(ms, 90)), 4),
        p99_ms=round(float(np.percentile(ms, 99)), 4), mean_ms=round(float(ms.mean()), 4),
        throughput_ips=round(float(batch * 1e3 / np.median(ms)), 2),
    )


def interleaved_rounds(runners: dict[str, Runner], batch: int, size: int, *, runs: int, warmup: int, rounds: int,
                       seed: int = 0) -> dict[str, list[list[float]]]:
    """Warm every runner up, then `rounds` rounds in which each runner does runs/rounds timed calls in turn.

    Returns each runner's call times (seconds), one list per round: a ratio within a round compares engines
    under the same machine conditions (edgeres.bench.speed_ratio).
    """
    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    per_round = max(1, -(-runs // rounds))
    times: dict[str, list[list[float]]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(rounds):
        for key in order if r % 2 == 0 else order[::-1]:
            run = runners[key]
            time.sleep(SETTLE_S)  # let the previous engine's worker threads stop spinning and park
            run(x)  # untimed: wake this engine's thread pool
            samples = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                run(x)
                samples.append(time.perf_counter() - t0)
            times[key].append(samples)
    return times


def pooled(batch: int, rounds: dict[str, list[list[float]]]) -> dict[str, LatencyStats]:
    """Latency statistics over all rounds' calls."""
    return {k: _stats(batch, [t for r in v for t in r]) for k, v in rounds.items()}


def interleaved(runners: dict[str, Runner], batch: int, size: int, *, runs: int, warmup: int, rounds: int,
                seed: int = 0) -> dict[str, LatencyStats]:
    """`interleaved_rounds`, pooled into one LatencyStats per runner."""
    return pooled(batch, interleaved_rounds(runners, batch, size, runs=runs, warmup=warmup, rounds=rounds, seed=seed))


def machine() -> dict:
    from edgeres.hostcpu import describe

    return {**describe(), "platform": platform.platform()}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("edgeres", "torch", "onnx", "onnxruntime", "nncf", "openvino"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
