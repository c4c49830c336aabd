"""`edgeres bench`: an artifact's latency, size and peak memory (measured by `edgeres.latency`), its top-1."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeres.backends.base import Artifact, open_artifact
from edgeres.errors import EdgeresError
from edgeres.hostcpu import describe
from edgeres.latency import BenchOptions, LatencyStats, Worker, measure


@dataclass(frozen=True)
class BenchResult:
    artifact: str
    runtime: str
    precision: str
    threads: int
    input_shape: list[int]
    size_mb: float
    peak_rss_mb: float
    memory_delta_mb: float
    rows: list[LatencyStats] = field(default_factory=list)
    host: dict = field(default_factory=dict)  # hostcpu.describe(): latency means little without the CPU

    @property
    def title(self) -> str:
        return (f"{Path(self.artifact).name}: {self.runtime} {self.precision}, {self.threads} threads"
                f"{host_text(self.host)}, {self.size_mb:.2f} MB, peak RSS {self.peak_rss_mb:.0f} MB "
                f"(+{self.memory_delta_mb:.0f} MB)")

    def to_dict(self) -> dict:
        return asdict(self)

    def table_rows(self):
        cols = ["batch", "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms", "images/s"]
        return cols, [[r.batch, r.runs, r.p50_ms, r.p90_ms, r.p99_ms, r.mean_ms, r.throughput_ips] for r in self.rows]


def host_text(host: dict) -> str:
    """" on AMD EPYC (avx2)" for a hostcpu.describe() record; empty for none."""
    if not host:
        return ""
    return f" on {host['cpu']}" + (f" ({', '.join(host['isa'])})" if host.get("isa") else "")


def speed_ratio(reference: list[list[float]], model: list[list[float]], draws: int = 2000) -> dict:
    """How many times faster `model` runs than `reference`, from per-round timings taken side by side.

    Each argument holds one list of call times per round; a round's ratio is reference median / model median,
    so both saw the same machine conditions. Returns the median ratio, its 95% bootstrap interval over rounds
    and the share of rounds the model was at least as fast (> 1: the model is faster).
    """
    ratios = np.array([np.median(r) / np.median(m) for r, m in zip(reference, model, strict=True)])
    rng = np.random.default_rng(0)
    boot = np.median(rng.choice(ratios, size=(draws, len(ratios))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": round(float(np.median(ratios)), 3), "ci95": [round(float(lo), 3), round(float(hi), 3)],
            "rounds_at_least_as_fast": round(float(np.mean(ratios >= 1.0)), 3), "rounds": len(ratios)}


def artifact_bytes(artifact: Artifact) -> int:
    """Bytes on disk of an artifact as its backend counts them (an OpenVINO IR: the .xml plus its .bin)."""
    return int(artifact.meta.get("bytes") or artifact.path.stat().st_size)


def input_shape_of(path: Path) -> list[int]:
    """(C, H, W) from the artifact's own metadata, the export folder's manifest.json, or the ONNX graph's input."""
    from edgeres import artifact_meta

    try:
        size = artifact_meta.read(path).input_size
        return [3, size, size]
    except EdgeresError:
        pass  # made by an older edgeres or another tool: the other sources below
    from edgeres import manifest

    shape = manifest.input_shape(path.parent)
    if shape:
        return shape
    if path.suffix == ".onnx":
        from edgeres.onnxgraph import load

        dims = load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        shape = [d.dim_value for d in dims[1:]]
        if shape and all(v > 0 for v in shape):
            return shape
    raise EdgeresError(f"cannot tell the input shape of {path.name}; re-export it (edgeres writes it into the file)")


def bench_artifact(artifact: Artifact, options: BenchOptions = BenchOptions(),
                   input_shape: list[int] | None = None, worker: Worker | None = None) -> BenchResult:
    """Time every batch size in `options` of `artifact` through its backend, in a fresh worker process."""
    shape = input_shape or input_shape_of(artifact.path)
    measured = worker.measure(artifact, options, shape) if worker else measure(artifact, options, shape)
    host = describe()
    threads = options.threads or host["cores_available"]
    return BenchResult(
        artifact=str(artifact.path),
        runtime=artifact.runtime,
        precision=artifact.precision,
        threads=threads,
        input_shape=list(shape),
        size_mb=round(artifact_bytes(artifact) / 1e6, 4),
        peak_rss_mb=measured.peak_rss_mb,
        memory_delta_mb=measured.memory_delta_mb,
        rows=measured.rows,
        host=host,
    )


def bench_path(path: str | os.PathLike, options: BenchOptions = BenchOptions()) -> BenchResult:
    return bench_artifact(open_artifact(path), options)


