"""Shared helpers for the kernel tests: launch device, tolerances, relative error and strided test inputs.

Every kernel test compares a Triton launch and an op against a float64 reference the same way, so it lives here once.
"""

import os
from typing import List, Optional

import torch

DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# The Triton interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even), doubling bf16 error.
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2 if DEVICE.type == "cuda" else 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``, with ``out`` promoted to float64."""
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def make(rows: int, cols: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A (rows, cols) tensor that is contiguous, a column slice (row stride > cols) or a transposed view."""
    if layout == "sliced":
        return torch.randn(rows, cols + 3, device=DEVICE).to(dtype)[:, 1:cols + 1]
    if layout == "transposed":
        return torch.randn(cols, rows, device=DEVICE).to(dtype).t()
    return torch.randn(rows, cols, device=DEVICE).to(dtype)


def f64(*ts: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The tensors as float64 for a reference call; None and boolean masks pass through unchanged."""
    return [t if t is None or t.dtype == torch.bool else t.double() for t in ts]
