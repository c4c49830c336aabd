"""A runtime's peak memory for one inference, measured: how far a fresh process's peak resident set rises.

Each backend measures its own (`Backend.peak_memory`, in the process that calls it), because runtimes allocate
differently: ONNX Runtime with its CPU arena off allocates and frees per run; OpenVINO's CPU plugin allocates on a
request's first inference and keeps it. `measure_peak` runs that member in a fresh spawned process (like latency,
so the figure does not depend on what this process did before), with glibc's mmap threshold fixed at 64 KiB:
every large buffer is then mapped when allocated and returned when freed (the default threshold grows after frees
and would serve later buffers from a heap that is not trimmed). Linux only: /proc/self/clear_refs resets the peak.
What the figure holds: the buffers the runtime allocates for the run (activations, the output, kernel
workspaces), not the caller's input (allocated before the baseline), the weights or the code.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeres.backends.base import Artifact, RuntimeOptions, get_backend
from edgeres.errors import EdgeresError

MMAP_THRESHOLD = 64 * 1024  # glibc M_MMAP_THRESHOLD: buffers above it are mapped and unmapped one by one
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class PeakMemory:
    """A runtime's measured peak memory for one inference at `batch` (bytes): the median of `runs`."""

    runtime: str
    batch: int
    bytes: int
    runs: list[int]
    settings: dict = field(default_factory=dict)  # how it was measured (the runtime's memory settings, threads)

    def to_dict(self) -> dict:
        return asdict(self)


def can_measure() -> bool:
    """True where the peak resident set can be reset (Linux's /proc/self/clear_refs)."""
    return _CLEAR_REFS.exists()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise EdgeresError(f"no {key} in /proc/self/status; peak memory is measured on Linux only")


def peak_rise(run: Callable[[], object]) -> int:
    """Bytes by which this process's peak resident set rises above its resident set during `run()`."""
    _CLEAR_REFS.write_text("5")  # reset the peak resident set (VmHWM) to the current one
    base = _status("VmRSS")
    run()
    return _status("VmHWM") - base


def summarize(runtime: str, batch: int, runs: Sequence[int], settings: dict) -> PeakMemory:
    """The median of `runs` as one PeakMemory."""
    return PeakMemory(runtime=runtime, batch=batch, bytes=int(statistics.median_low(runs)), runs=list(runs),
                      settings=settings)


def _in_fresh_process(artifact: Artifact, batch: int, input_shape: tuple[int, ...], threads: int) -> PeakMemory:
    import ctypes

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt") or libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        raise EdgeresError("cannot fix the allocator's mmap threshold (glibc mallopt); peak memory not measured")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # this process is ours: set before the runtime loads
    backend = get_backend(artifact.runtime)
    return backend.peak_memory(artifact, batch=batch, input_shape=input_shape,
                               options=RuntimeOptions(threads=threads))


def measure_peak(artifact: Artifact, *, batch: int, input_shape: Sequence[int], threads: int = 1,
                 timeout: float = 600) -> PeakMemory:
    """The artifact's peak memory for one inference at `batch`, measured by its backend in a fresh process."""
    if batch < 1:
        raise EdgeresError(f"batch must be >= 1, got {batch}")
    if not can_measure():
        raise EdgeresError("peak memory is measured on Linux only (/proc/self/clear_refs resets the peak)")
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # leaving the block terminates the worker
        job = pool.apply_async(_in_fresh_process, (artifact, batch, tuple(int(v) for v in input_shape), threads))
        try:
            return job.get(timeout)
        except multiprocessing.TimeoutError:
            raise EdgeresError(f"measuring the peak memory of {artifact.path} took over {timeout:.0f} s") from None
