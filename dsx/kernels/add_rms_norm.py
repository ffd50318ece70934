"""Fused residual add + RMSNorm (``dsx::add_rms_norm``) and plain RMSNorm (``dsx::rms_norm``).

One Triton kernel serves both: one read of each input, statistics in fp32, Hugging Face Llama numerics.
"""

from typing import Any, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsx.kernels._triton import ROW_CONFIGS, TRITON_DTYPES, next_pow2, prune_row_configs, use_triton

MAX_BLOCK = 65536


@triton.autotune(
    configs=ROW_CONFIGS,
    key=["BLOCK", "HAS_RESIDUAL"],
    prune_configs_by={"early_config_prune": prune_row_configs},
)
@triton.jit
def _rms_norm_fwd(
    X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (h + r).to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=mask)
        h = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    y = (h * rstd).to(Y.dtype.element_ty)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) * w).to(Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y, mask=mask)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], eps: float,
    kernel: Any = _rms_norm_fwd,
) -> Tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = _rows(x)
    weight = None if weight is None else weight.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2 = s = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r2 = _rows(residual)
        s = torch.empty_like(y)
    if x2.shape[0]:
        kernel[(x2.shape[0],)](
            x2, r2, weight, y, s, x2.stride(0), 0 if r2 is None else r2.stride(0), y.stride(0),
            0 if s is None else s.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, BLOCK=next_pow2(n),
        )
    return y.view(x.shape), (x if s is None else s.view(x.shape))


def add_rms_norm_triton(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel directly: ``(rms_norm(x + residual), x + residual)``.

    With ``residual=None`` it returns ``(rms_norm(x), x)``.
    """
    return _launch(x, residual, weight, eps)


def reference(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch definition (Hugging Face ``LlamaRMSNorm``): returns ``(normed, x + residual)``."""
    s = x if residual is None else (x + residual).to(x.dtype)
    h = s.to(_compute_dtype(s))
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed if weight is None else (normed * weight).to(x.dtype)), s


def _use_kernel(x: torch.Tensor) -> bool:
    return use_triton(x) and x.dtype in TRITON_DTYPES and x.shape[-1] <= MAX_BLOCK


@triton_op("dsx::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    if _use_kernel(x):
        return _launch(x, residual, weight, eps, wrap_triton(_rms_norm_fwd))
    return reference(x, residual, weight, eps)


@triton_op("dsx::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if _use_kernel(x):
        return _launch(x, None, weight, eps, wrap_triton(_rms_norm_fwd))[0]
    return reference(x, None, weight, eps)[0]


@_add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


def _backward(
    s: torch.Tensor, weight: Optional[torch.Tensor], eps: float, grad: torch.Tensor, need_weight: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Closed-form RMSNorm backward given the norm's input ``s``: (grad of s in compute dtype, grad of weight)."""
    h = s.to(_compute_dtype(s))
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = h * rstd
    g = grad.to(h.dtype)
    dn = g if weight is None else g * weight.to(h.dtype)
    dh = rstd * (dn - normed * (dn * normed).mean(-1, keepdim=True))
    dw = None
    if need_weight:
        dw = (g * normed.to(s.dtype).to(h.dtype)).reshape(-1, s.shape[-1]).sum(0).to(weight.dtype)
    return dh, dw


def _setup_add(ctx, inputs, output):
    x, residual, weight, ctx.eps = inputs
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.save_for_backward(output[1], weight)


def _backward_add(ctx, grad_out, grad_sum):
    s, weight = ctx.saved_tensors
    dh, dw = _backward(s, weight, ctx.eps, grad_out, ctx.needs_input_grad[2])
    dh = dh + grad_sum
    return dh.to(ctx.dtypes[0]), dh.to(ctx.dtypes[1]), dw, None


def _setup(ctx, inputs, output):
    x, weight, ctx.eps = inputs
    ctx.save_for_backward(x, weight)


def _backward_plain(ctx, grad_out):
    x, weight = ctx.saved_tensors
    dh, dw = _backward(x, weight, ctx.eps, grad_out, ctx.needs_input_grad[1])
    return dh.to(x.dtype), dw, None


_add_rms_norm_op.register_autograd(_backward_add, setup_context=_setup_add)
_rms_norm_op.register_autograd(_backward_plain, setup_context=_setup)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x + residual`` over the last dim, plus the sum itself (the new residual stream).

    ``normed = (h * rsqrt(mean(h**2, -1) + eps)).to(x.dtype) * weight`` with ``h = (x + residual)`` in fp32;
    both outputs have ``x``'s dtype. ``residual`` must have ``x``'s shape.
    """
    return torch.ops.dsx.add_rms_norm(x, residual, weight, eps)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with Hugging Face Llama numerics (fp32 statistics, cast before ``* weight``)."""
    return torch.ops.dsx.rms_norm(x, weight, eps)
