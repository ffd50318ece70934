"""Scaled masked softmax over the last dim (``dsx::scaled_masked_softmax``): ``softmax(x * scale + mask, -1)``.

Attention scores are scaled, masked and normalized in one read; a broadcast mask is read through stride-0 dims.
"""

from typing import Any, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsx.kernels._triton import ROW_CONFIGS, TRITON_DTYPES, next_pow2, prune_row_configs, use_triton

MAX_BLOCK = 65536
MAX_DIMS = 4
_NO_MASK, _ADDITIVE, _BOOLEAN = 0, 1, 2


@triton.autotune(
    configs=ROW_CONFIGS,
    key=["BLOCK", "MASK_KIND"],
    prune_configs_by={"early_config_prune": prune_row_configs},
)
@triton.jit
def _softmax_fwd(
    X, M, Y, H, Q, N, sx0, sx1, sx2, sx3, sm0, sm1, sm2, sm3, scale,
    MASK_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    q = row % Q
    h = (row // Q) % H
    b = row // (Q * H)
    cols = tl.arange(0, BLOCK)
    inb = cols < N
    s = tl.load(X + b * sx0 + h * sx1 + q * sx2 + cols * sx3, mask=inb, other=0.0).to(tl.float32) * scale
    m_offs = b * sm0 + h * sm1 + q * sm2 + cols * sm3
    if MASK_KIND == 1:
        s += tl.load(M + m_offs, mask=inb, other=0.0).to(tl.float32)
    if MASK_KIND == 2:
        s = tl.where(tl.load(M + m_offs, mask=inb, other=0) != 0, s, float("-inf"))
    s = tl.where(inb, s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=0))
    tl.store(Y + row * N + cols, (e / tl.sum(e, axis=0)).to(Y.dtype.element_ty), mask=inb)


def _check(x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    if x.dim() == 0:
        raise ValueError("scaled_masked_softmax: x must have at least one dimension")
    if mask is None:
        return
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise ValueError(
            f"scaled_masked_softmax: mask must be bool (True = keep) or floating (additive), got {mask.dtype}"
        )
    if mask.dim() > x.dim() or any(m not in (1, n) for m, n in zip(reversed(mask.shape), reversed(x.shape))):
        raise ValueError(
            f"scaled_masked_softmax: mask shape {tuple(mask.shape)} does not broadcast to x shape {tuple(x.shape)}"
        )


def _padded(t: torch.Tensor) -> Tuple[list, list]:
    """Sizes and strides of ``t`` left-padded to 4 dims (padding has size 1, stride 0)."""
    pad = MAX_DIMS - t.dim()
    return [1] * pad + list(t.shape), [0] * pad + list(t.stride())


def _launch(
    x: torch.Tensor, mask: Optional[torch.Tensor], scale: float, kernel: Any = _softmax_fwd
) -> torch.Tensor:
    _check(x, mask)
    if x.dim() > MAX_DIMS:
        raise ValueError(f"scaled_masked_softmax_triton: x has {x.dim()} dims, at most {MAX_DIMS} are supported")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    (_, h, q, n), x_strides = _padded(x)
    m_strides = [0] * MAX_DIMS if mask is None else _padded(mask.expand(x.shape))[1]
    kind = _NO_MASK if mask is None else _BOOLEAN if mask.dtype == torch.bool else _ADDITIVE
    if x.numel():
        kernel[(x.numel() // n,)](
            x, mask, y, h, q, n, *x_strides, *m_strides, float(scale), MASK_KIND=kind, BLOCK=next_pow2(n),
        )
    return y


def scaled_masked_softmax_triton(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Launch the Triton kernel directly (``x`` up to 4-D, any strides; ``mask`` broadcast without copying)."""
    return _launch(x, mask, scale)


def reference(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Plain PyTorch definition: ``softmax(x * scale + mask, -1)`` in fp32 (fp64 for fp64 inputs), cast to ``x.dtype``.

    A bool mask keeps True positions and sets False ones to -inf; a row with nothing kept is NaN, as in torch.softmax.
    """
    _check(x, mask)
    s = x.to(torch.promote_types(x.dtype, torch.float32))
    if scale != 1.0:
        s = s * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    return torch.softmax(s, -1).to(x.dtype).contiguous()


@triton_op("dsx::scaled_masked_softmax", mutates_args=())
def _softmax_op(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    if use_triton(x) and x.dtype in TRITON_DTYPES and x.dim() <= MAX_DIMS and x.shape[-1] <= MAX_BLOCK:
        return _launch(x, mask, scale, wrap_triton(_softmax_fwd))
    return reference(x, mask, scale)


@_softmax_op.register_fake
def _(x, mask, scale):
    _check(x, mask)
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    ctx.scale = inputs[2]
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output)


def _backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
    (y,) = ctx.saved_tensors
    y = y.to(torch.promote_types(y.dtype, torch.float32))
    g = grad.to(y.dtype)
    dx = ctx.scale * y * (g - (g * y).sum(-1, keepdim=True))
    return dx.to(ctx.dtype), None, None


_softmax_op.register_autograd(_backward, setup_context=_setup)


def scaled_masked_softmax(x: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """``softmax(x * scale + mask, dim=-1)`` computed in fp32, returned in ``x``'s dtype.

    ``mask`` broadcasts to ``x`` (e.g. [B, 1, 1, N] or [B, 1, Q, N] for x [B, H, Q, N]) and is either additive
    (floating) or boolean (True = keep, False = -inf). Rows with every position masked out are NaN, exactly like
    ``torch.softmax`` of an all -inf row. Gradients flow to ``x`` only; the mask is treated as a constant.
    """
    return torch.ops.dsx.scaled_masked_softmax(x, mask, scale)
