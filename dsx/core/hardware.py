"""What this machine's CPU can compute fast: its feature flags, read once, for the kernels and formats that choose a
path by hardware (``torch._int_mm`` is fast only with AVX512-VNNI, bf16 matmuls only with AVX512-BF16 or AMX).
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it does not exist)."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_int8_dot() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI or AMX) that ATen's ``torch._int_mm`` uses;
    without them it runs a scalar loop, tens of times slower than an fp32 matmul."""
    return bool({"avx512_vnni", "amx_int8"} & cpu_flags())
