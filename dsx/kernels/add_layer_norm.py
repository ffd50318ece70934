"""Fused residual add + LayerNorm over the last dim (``dsx::add_layer_norm``).

Pre-norm transformer blocks read the residual stream twice (add, then norm); the kernel reads it once.
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
    key=["BLOCK"],
    prune_configs_by={"early_config_prune": prune_row_configs},
)
@triton.jit
def _add_layer_norm_fwd(
    X, R, W, B, Y, S, stride_x, stride_r, stride_y, stride_s, N, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(S.dtype.element_ty)
    tl.store(S + row * stride_s + cols, s, mask=mask)
    h = s.to(tl.float32)
    mean = tl.sum(h, axis=0) / N
    d = tl.where(mask, h - mean, 0.0)
    y = d * tl.rsqrt(tl.sum(d * d, axis=0) / N + eps)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: float, kernel: Any = _add_layer_norm_fwd,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    n = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y)
    if x2.shape[0]:
        kernel[(x2.shape[0],)](
            x2, r2, weight, bias, y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), n, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=next_pow2(n),
        )
    return y.view(x.shape), s.view(x.shape)


def add_layer_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel directly: ``(layer_norm(x + residual), x + residual)``."""
    return _launch(x, residual, weight, bias, eps)


def reference(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch definition: ``(layer_norm(x + residual), x + residual)``, both in ``x``'s dtype."""
    s = (x + residual).to(x.dtype)
    return torch.nn.functional.layer_norm(s, s.shape[-1:], weight, bias, eps).to(x.dtype), s


@triton_op("dsx::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x) and x.dtype in TRITON_DTYPES and x.shape[-1] <= MAX_BLOCK:
        return _launch(x, residual, weight, bias, eps, wrap_triton(_add_layer_norm_fwd))
    return reference(x, residual, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _add_layer_norm_fake(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, residual, weight, bias, ctx.eps = inputs
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(output[1], weight)


def _backward(ctx, grad_out, grad_sum):
    s, weight = ctx.saved_tensors
    h = s.to(torch.promote_types(s.dtype, torch.float32))
    var, mean = torch.var_mean(h, -1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + ctx.eps)
    normed = (h - mean) * rstd
    g = grad_out.to(h.dtype)
    dn = g if weight is None else g * weight.to(h.dtype)
    dh = rstd * (dn - dn.mean(-1, keepdim=True) - normed * (dn * normed).mean(-1, keepdim=True)) + grad_sum
    rows = g.reshape(-1, s.shape[-1])
    dw = (rows * normed.reshape(rows.shape)).sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
    db = rows.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return dh.to(ctx.dtypes[0]), dh.to(ctx.dtypes[1]), dw, db, None


_add_layer_norm_op.register_autograd(_backward, setup_context=_setup)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of ``x + residual`` over the last dim, plus the sum itself (the new residual stream).

    Statistics are computed in fp32; both outputs have ``x``'s dtype. ``residual`` must have ``x``'s shape.
    """
    return torch.ops.dsx.add_layer_norm(x, residual, weight, bias, eps)
