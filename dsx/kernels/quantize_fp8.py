"""Dynamic row-wise FP8 quantization (``dsx::quantize_fp8_rowwise``): float8_e4m3fn with one fp32 scale per row.

FP8 GEMMs (Hopper and later) take row-scaled activations; one kernel finds each row's absmax (or takes a given one, the
full row's when ``x`` is one rank's slice of it) and casts it to fp8.
"""

from typing import Any, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsx.kernels._triton import ROW_CONFIGS, prune_row_configs, use_triton
from dsx.kernels.quantize_per_token import (
    AMAX_MIN, check_absmax, check_quantize_input, chunk_rows, launch_rowwise, row_absmax, row_amax, scale_shape,
)

FP8_MAX = 448.0
FP8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability from which Triton converts to ``tl.float8e4nv`` (Ada, Hopper)."""


@triton.autotune(configs=ROW_CONFIGS, key=["BLOCK"], prune_configs_by={"early_config_prune": prune_row_configs})
@triton.jit
def _quantize_fp8_rowwise_fwd(X, Q, S, stride_xm, stride_xn, N, amax_min, A, HAS_AMAX: tl.constexpr,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    cols = tl.arange(0, BLOCK)
    if HAS_AMAX:
        amax = tl.maximum(tl.load(A + row).to(tl.float32), amax_min)
    else:
        amax = row_absmax(x_row, stride_xn, N, amax_min, BLOCK)
    scale = tl.math.div_rn(amax, 448.0)
    tl.store(S + row, scale)
    for start in range(0, N, BLOCK):
        c = start + cols
        x = tl.load(x_row + c * stride_xn, mask=c < N, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
        tl.store(Q + row * N + c, q.to(Q.dtype.element_ty), mask=c < N)


def _launch(x: torch.Tensor, absmax: Optional[torch.Tensor] = None,
            kernel: Any = _quantize_fp8_rowwise_fwd) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_rowwise("quantize_fp8_rowwise", x, kernel, torch.float8_e4m3fn, absmax)


def quantize_fp8_rowwise_triton(x: torch.Tensor,
                                absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel directly: ``(q, scale)`` as in ``reference``."""
    return _launch(x, absmax)


def reference(x: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch definition, in fp32: ``scale = max(amax, 1e-12) / 448`` per row (``amax`` the row's ``max |x|``
    or ``absmax``) and ``q = (x / scale).clamp(-448, 448)`` cast to float8_e4m3fn (round to nearest even)."""
    check_quantize_input("quantize_fp8_rowwise", x)
    check_absmax("quantize_fp8_rowwise", x, absmax)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) if absmax is None else absmax.float()
    scale = amax.clamp_min(AMAX_MIN) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _quantize_aten(x: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``reference`` without full-size fp32 temporaries (in eager mode): the quotient is cast chunk by chunk."""
    check_quantize_input("quantize_fp8_rowwise", x)
    check_absmax("quantize_fp8_rowwise", x, absmax)
    x2 = x.reshape(-1, x.shape[-1])
    scale2 = (row_amax(x2) if absmax is None else absmax.reshape(-1, 1).float().clamp_min(AMAX_MIN)) / FP8_MAX
    scale = scale2.view(scale_shape(x))
    if torch.compiler.is_compiling():
        return torch.div(x2, scale2).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(x.shape), scale
    q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    step = chunk_rows(x2.shape[1])
    for s in range(0, x2.shape[0], step):
        q[s:s + step] = torch.div(x2[s:s + step], scale2[s:s + step]).clamp_(-FP8_MAX, FP8_MAX)
    return q.view(x.shape), scale


def _fp8_triton(x: torch.Tensor) -> bool:
    return use_triton(x) and torch.cuda.get_device_capability(x.device) >= FP8_MIN_CAPABILITY


@triton_op("dsx::quantize_fp8_rowwise", mutates_args=())
def _quantize_fp8_rowwise_op(x: torch.Tensor,
                             absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if _fp8_triton(x):
        return _launch(x, absmax, wrap_triton(_quantize_fp8_rowwise_fwd))
    return _quantize_aten(x, absmax)


@_quantize_fp8_rowwise_op.register_fake
def _(x, absmax=None):
    check_quantize_input("quantize_fp8_rowwise", x)
    check_absmax("quantize_fp8_rowwise", x, absmax)
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(scale_shape(x), dtype=torch.float32)


def quantize_fp8_rowwise(x: torch.Tensor,
                         absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic row-wise float8_e4m3fn quantization of ``x`` (fp32, bf16 or fp16, any leading dims) over its last dim.

    Args:
        x: the activations.
        absmax: optional per-row maximum magnitude of shape ``x.shape[:-1] + (1,)`` to scale with instead of the
            rows' own (the full row's on a rowwise tensor-parallel shard); values beyond it clamp to +-448.

    Returns:
        ``(q, scale)``: ``q`` float8_e4m3fn shaped like ``x`` with ``x ~= q.float() * scale``, ``scale`` fp32 of shape
        ``x.shape[:-1] + (1,)`` equal to ``max(amax, 1e-12) / 448``. Computed in fp32. The Triton kernel runs on CUDA
        devices of compute capability 8.9 or later; elsewhere the op runs ATen ops.

    Raises:
        ValueError: ``x`` is not fp32 / bf16 / fp16 with a non-empty last dim, or ``absmax`` is not a floating tensor
            of shape ``x.shape[:-1] + (1,)`` on ``x``'s device.
    """
    return torch.ops.dsx.quantize_fp8_rowwise(x, absmax)
