"""Shared Triton plumbing for dsx kernels: interpreter detection and autotune pruning.

Under ``TRITON_INTERPRET=1`` (CPU tests) autotuning has no GPU to benchmark on, so one config is kept.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def prune_for_interpreter(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` hook: keep only the first config when interpreting."""
    return configs[:1] if interpreting() else configs


ROW_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 1, 2, 8, 16)]
"""Autotune configs of the one-program-per-row kernels (norms, softmax, per-row quantize), keyed by ``BLOCK``."""
ROW_ELEMENTS_PER_THREAD = (1, 64)
"""The range of a row's ``BLOCK`` elements per thread a row config may hold: past 64 a config spills registers and
compiles for minutes (one warp over a 65536-wide block: 70-121 s each), below 1 threads idle."""


def prune_row_configs(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` hook of the row kernels: the warp counts whose threads hold
    ``ROW_ELEMENTS_PER_THREAD`` of the ``BLOCK``-wide row (the config nearest to that range when none does), then
    ``prune_for_interpreter``."""
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    if isinstance(block, int):
        lo, hi = ROW_ELEMENTS_PER_THREAD

        def per_thread(c):
            return block / (32 * c.num_warps)

        kept = [c for c in configs if lo <= per_thread(c) <= hi]
        configs = kept or [min(configs, key=lambda c: max(per_thread(c) / hi, lo / per_thread(c)))]
    return prune_for_interpreter(configs, named_args)


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op called on ``x`` should launch its Triton kernel (CUDA tensors only)."""
    return x.is_cuda


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (block size for a whole row)."""
    return 1 << max(0, (n - 1).bit_length())


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Dtypes the dsx Triton kernels take; other dtypes (e.g. float64) use the ATen path."""
