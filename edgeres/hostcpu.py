"""What this host's CPU can do, from Linux /proc/cpuinfo (empty elsewhere)."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The instruction-set extensions that decide which int8/bf16 kernels the CPU runtimes pick.
KERNEL_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first CPU's /proc/cpuinfo fields; empty where the file is absent."""
    path = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block ends here
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags, e.g. {"avx512f", "amx_int8", ...}."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_name() -> str:
    """The CPU model, e.g. "AMD EPYC" or "Intel(R) Xeon(R) Platinum 8488C"."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def describe() -> dict:
    """The host in the terms that decide CPU latency: model, usable cores, kernel-relevant ISA."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_name(), "cores_available": cores, "isa": sorted(cpu_flags() & set(KERNEL_ISA))}


def has_amx_int8() -> bool:
    """Intel AMX int8 tiles (Sapphire Rapids and later)."""
    return "amx_int8" in cpu_flags()


def has_native_bf16() -> bool:
    """bfloat16 arithmetic in hardware (AMX or AVX512-BF16): where bf16 autocast speeds CPU training up."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
