"""A runtime's peak memory for one inference, measured: how far this process's peak resident set rises.

Each backend measures its own with these (`Backend.peak_memory`), because runtimes allocate differently: ONNX
Runtime with its CPU arena off allocates and frees per run; OpenVINO's CPU plugin allocates on a request's first
inference and keeps it. `memory.measure_peak` runs that member in a fresh process. Linux only:
/proc/self/clear_refs resets the peak. What the figure holds: the buffers the runtime allocates for the run
(activations, the output, kernel workspaces), not the caller's input (allocated before the baseline), the
weights or the code.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeres.errors import EdgeresError

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

