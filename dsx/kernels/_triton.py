"""Shared Triton plumbing for dsx kernels: interpreter detection and autotune pruning.

Under ``TRITON_INTERPRET=1`` (CPU tests) autotuning has no GPU to benchmark on, so one config is kept.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def prune_for_interpreter(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` hook: keep only the first config when interpreting."""
    return configs[:1] if interpreting() else configs


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op called on ``x`` should launch its Triton kernel (CUDA tensors only)."""
    return x.is_cuda


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (block size for a whole row)."""
    return 1 << max(0, (n - 1).bit_length())


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Dtypes the dsx Triton kernels take; other dtypes (e.g. float64) use the ATen path."""
