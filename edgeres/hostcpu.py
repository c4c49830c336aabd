"""What this host's CPU can do, from Linux /proc/cpuinfo flags (empty elsewhere)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags, e.g. {"avx512f", "amx_int8", ...}; empty where /proc/cpuinfo is absent."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_amx_int8() -> bool:
    """Intel AMX int8 tiles (Sapphire Rapids and later)."""
    return "amx_int8" in cpu_flags()


def has_native_bf16() -> bool:
    """bfloat16 arithmetic in hardware (AMX or AVX512-BF16): where bf16 autocast speeds CPU training up."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
