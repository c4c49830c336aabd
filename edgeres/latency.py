"""Latency of an artifact through its backend, measured in a fresh worker process.

The one measurement behind `export`, `fit`, `bench` and the benchmarks: load the artifact, warm up, time
each requested batch size one call at a time, report percentiles, throughput and the worker's peak memory.

Why a worker: a figure taken inside the process that just trained, calibrated or evaluated depends on
what that process did before (its thread pools, its heap, whatever the libraries it ran left behind), and
users read ours as what the artifact does on its own. The worker is *spawned* (a new interpreter, not a fork
of this one), imports only numpy, the backend and its runtime, and so measures the artifact the way
`edgeres bench` in a fresh shell does.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edgeres.backends.base import Artifact, RuntimeOptions, get_backend
from edgeres.errors import EdgeresError


@dataclass(frozen=True)
class BenchOptions:
    """What a latency measurement runs: batch sizes, untimed warm-up calls, timed calls at batch 1, threads."""

    batch_sizes: tuple[int, ...] = (1, 8, 64)
    warmup: int = 10
    runs: int = 100  # at batch 1; larger batches get fewer (runs_at) so each size takes about the same time
    threads: int | None = None  # None: the runtime's default (all cores)
    seed: int = 0

    def runs_at(self, batch: int) -> int:
        """Timed calls at `batch`: `runs` at batch <= 8, then fewer in proportion, at least 5."""
        return max(self.runs // max(batch // 8, 1), 5)


@dataclass(frozen=True)
class LatencyStats:
    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float


@dataclass(frozen=True)
class Measurement:
    """Every batch size of one artifact, and the measuring worker's memory (MiB) and identity."""

    rows: list[LatencyStats]
    peak_rss_mb: float
    memory_delta_mb: float  # peak RSS during load + runs, above the worker's RSS before loading
    worker_pid: int
    fresh_process: bool = True
    notes: list[str] = field(default_factory=list)

    def at(self, batch: int) -> LatencyStats:
        return next(r for r in self.rows if r.batch == batch)


def time_runs(run, batch: np.ndarray, warmup: int, runs: int) -> LatencyStats:
    """Call `run(batch)` `warmup` times untimed, then `runs` times timed one by one."""
    if warmup < 0 or runs < 1:
        raise EdgeresError(f"need warmup >= 0 and runs >= 1, got {warmup} and {runs}")
    for _ in range(warmup):
        run(batch)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        run(batch)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    n = batch.shape[0]
    return LatencyStats(
        batch=n,
        runs=runs,
        p50_ms=round(float(np.percentile(ms, 50)), 4),
        p90_ms=round(float(np.percentile(ms, 90)), 4),
        p99_ms=round(float(np.percentile(ms, 99)), 4),
        mean_ms=round(float(ms.mean()), 4),
        throughput_ips=round(float(n / np.median(times)), 2),
    )


class _PeakRss:
    """Samples this process's resident memory in a thread; `peak` is the highest seen (bytes)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure_here(artifact: Artifact, options: BenchOptions, input_shape: Sequence[int]) -> Measurement:
    """Load `artifact` and time every batch size in this process (the worker's body; callers use `measure`)."""
    import os

    for b in options.batch_sizes:
        if b < 1:
            raise EdgeresError(f"batch sizes must be >= 1, got {b}")
    backend = get_backend(artifact.runtime)
    rng = np.random.default_rng(options.seed)
    with _PeakRss() as mem:
        before = mem.peak
        session = backend.load(artifact, RuntimeOptions(threads=options.threads))
        rows = []
        for b in options.batch_sizes:
            x = rng.standard_normal((b, *input_shape), dtype=np.float32)
            rows.append(time_runs(lambda a: backend.run(session, a), x, options.warmup, options.runs_at(b)))
    return Measurement(rows=rows, peak_rss_mb=round(mem.peak / 2**20, 1),
                       memory_delta_mb=round((mem.peak - before) / 2**20, 1), worker_pid=os.getpid(),
                       fresh_process=False)


class Worker:
    """One spawned process that measures artifacts one after another (`with Worker() as w: w.measure(...)`).

    Measuring in it, rather than here, keeps the figure independent of this process's history; reusing it
    for several artifacts saves the interpreter start (about a second) per measurement.
    """

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def measure(self, artifact: Artifact, options: BenchOptions, input_shape: Sequence[int]) -> Measurement:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        result = self._pool.submit(measure_here, artifact, options, tuple(int(v) for v in input_shape)).result()
        return Measurement(rows=result.rows, peak_rss_mb=result.peak_rss_mb, memory_delta_mb=result.memory_delta_mb,
                           worker_pid=result.worker_pid, fresh_process=True, notes=result.notes)


def measure(artifact: Artifact, options: BenchOptions, input_shape: Sequence[int]) -> Measurement:
    """Latency of `artifact` at each of `options.batch_sizes`, taken in a fresh spawned worker process."""
    with Worker() as w:
        return w.measure(artifact, options, input_shape)
