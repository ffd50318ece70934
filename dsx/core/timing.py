"""Wall-clock timing for demos and benchmarks: warm up, then the median of repeated runs, in milliseconds.

CUDA work is synchronized around each run so GPU timings are real, not launch latencies; ``compare_ms``
interleaves the candidates run by run so machine drift hits them all alike.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch


def measure_ms(fn: Callable[[], Any], *, warmup: int = 3, iters: int = 10, min_time_s: float = 0.0) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs (more while under ``min_time_s``), after ``warmup``."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < iters or time.perf_counter() - start < min_time_s:
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def compare_ms(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 3, iters: int = 10) -> dict[str, float]:
    """Median milliseconds of each function, timed in round-robin (one call of each per round)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        sync()
        for _ in range(iters):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                sync()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def cpu_name() -> str:
    """The CPU model for benchmark headers (``/proc/cpuinfo``'s model name, else the machine type)."""
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
             if ln.startswith("model name")] if info.exists() else []
    return names[0] if names else platform.machine()


def paired_ms(a: Callable[[], Any], b: Callable[[], Any], *, rounds: int = 5,
              min_block_s: float = 0.2) -> tuple[float, float, float, float]:
    """Time ``a`` and ``b`` side by side: ``rounds`` rounds, each a block of calls of one then the other (the order
    alternating), each block at least ``min_block_s`` long after a warm-up call.

    Returns:
        ``(a_ms, b_ms, speedup, spread)``: the median milliseconds per call of each, the median over rounds of
        ``a_ms / b_ms``, and the spread of that ratio (half its range over the rounds, relative to the median).
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def block(fn: Callable[[], Any]) -> float:
        fn()
        sync()
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < min_block_s:
            fn()
            sync()
            calls += 1
        return (time.perf_counter() - start) * 1e3 / calls

    times: dict[str, list[float]] = {"a": [], "b": []}
    with torch.no_grad():
        for r in range(rounds):
            for key in (("a", "b") if r % 2 == 0 else ("b", "a")):
                times[key].append(block(a if key == "a" else b))
    ratios = [x / y for x, y in zip(times["a"], times["b"])]
    ratio = statistics.median(ratios)
    return statistics.median(times["a"]), statistics.median(times["b"]), ratio, (max(ratios) - min(ratios)) / (
        2 * ratio)
