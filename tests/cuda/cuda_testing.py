"""Shared device selection and tolerances of the CUDA tests (``tests/cuda``).

The tests run on a CUDA device with the Triton kernels compiled for it (``TRITON_INTERPRET`` unset or ``0``, as
``benchmarks/gpu_check.sh`` exports it) and are skipped elsewhere. ``DSX_CUDA_TESTS_DEVICE`` overrides that:

* ``cpu``: run the same tests on CPU tensors, so that they are checked where there is no GPU (the ops then take their
  ATen paths, the direct Triton launches run in the interpreter under ``TRITON_INTERPRET=1``); what needs a real GPU
  (2:4 semi-structured kernels, compute-capability gates) skips with its reason.
* ``cuda``: require the GPU: a machine without CUDA, or with ``TRITON_INTERPRET=1``, fails collection instead of
  skipping every test silently.

Nothing here touches CUDA at import beyond ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.kernels._triton import interpreting

SWITCH = "DSX_CUDA_TESTS_DEVICE"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
"""``max |out - ref| / max |ref|`` allowed against a float64 reference, by dtype: fp32 rounding; bf16 and fp16 one
rounding of the output (doubled for bf16: the Triton interpreter truncates fp32 -> bf16 casts)."""
GRAD_TOL = 1e-4
"""Relative error allowed for fp32 gradients (closed-form backward in fp32) against float64 autograd."""


def _select() -> Tuple[Optional[torch.device], str]:
    want = os.environ.get(SWITCH, "").strip().lower()
    if want not in ("", "cpu", "cuda"):
        raise ValueError(f"{SWITCH}={want!r}: expected 'cpu', 'cuda' or unset")
    if want == "cpu":
        return torch.device("cpu"), ""
    reason = ""
    if not torch.cuda.is_available():
        reason = (f"no CUDA device (torch.cuda.is_available() is False); {SWITCH}=cpu runs these tests on CPU "
                  "tensors")
    elif interpreting():
        reason = ("TRITON_INTERPRET=1 (tests/conftest.py's default) would run the Triton kernels in the interpreter; "
                  "export TRITON_INTERPRET=0 as benchmarks/gpu_check.sh does")
    if reason and want == "cuda":
        raise RuntimeError(f"{SWITCH}=cuda, but the CUDA tests cannot run: {reason}")
    return (None, reason) if reason else (torch.device("cuda"), "")


DEVICE, SKIP_REASON = _select()
"""The device the tests run on (None: they skip, for ``SKIP_REASON``)."""
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
needs_device = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
"""Module mark of every test file here: ``pytestmark = needs_device``."""


def require_cuda(what: str) -> None:
    """Skip the calling test unless it runs on a real CUDA device."""
    if not ON_CUDA:
        pytest.skip(f"{what} needs a real CUDA device ({SWITCH}=cpu runs on CPU tensors)")


def require_capability(capability: Tuple[int, int], what: str) -> None:
    """On CUDA, skip the calling test on a GPU below ``capability``; no-op on the CPU."""
    if ON_CUDA and torch.cuda.get_device_capability(DEVICE) < capability:
        have = torch.cuda.get_device_capability(DEVICE)
        pytest.skip(f"{what} needs compute capability >= {capability[0]}.{capability[1]}, this GPU has "
                    f"{have[0]}.{have[1]}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64 (both moved to the CPU)."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    a, b = a.detach().cpu().double().flatten(), b.detach().cpu().double().flatten()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def first(out):
    """A model's main output: the tensor itself, or the first element of a tuple / Hugging Face output."""
    return out if isinstance(out, torch.Tensor) else out[0]


class MLP(nn.Module):
    """Two linears whose widths every tested path takes: fp8 (multiples of 16), int4 (of its group size 128) and the
    2:4 kernels (in_features multiples of 64, out_features of 32)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(128, 256), nn.Linear(256, 64)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))
