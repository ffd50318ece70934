"""Fused bias add + activation (``dsx::bias_act``): ``act(x + bias)`` with the bias over the last dim.

Fusing the Linear bias into its GELU/SiLU/ReLU epilogue reads and writes the activation once instead of twice.
"""

from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import CustomOpDef, triton_op, wrap_triton

from dsx.kernels._triton import TRITON_DTYPES, prune_for_interpreter, use_triton

ACTS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((256, 2), (1024, 4), (2048, 8), (4096, 8))
]


@triton.jit
def act_fn(h, ACT: tl.constexpr):
    """Activation ``ACT`` (an index into ``ACTS``) of an fp32 block."""
    if ACT == 0:
        y = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 1:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u)
        y = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    elif ACT == 2:
        y = h * tl.sigmoid(h)
    else:
        y = tl.where(h > 0.0, h, 0.0)
    return y


@triton.autotune(
    configs=ELEMENTWISE_CONFIGS, key=["N", "HAS_BIAS", "ACT"],
    prune_configs_by={"early_config_prune": prune_for_interpreter},
)
@triton.jit
def _bias_act_fwd(
    X, B, Y, stride_xm, stride_xn, stride_b, numel, N,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    row, col = offs // N, offs % N
    h = tl.load(X + row * stride_xm + col * stride_xn, mask=inb, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B + col * stride_b, mask=inb, other=0.0).to(tl.float32)
    tl.store(Y + offs, act_fn(h, ACT).to(Y.dtype.element_ty), mask=inb)


def check_act(act: str) -> int:
    """The kernel index of activation ``act``; ValueError naming the valid ones otherwise."""
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}; valid activations are {sorted(ACTS)}")
    return ACTS[act]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input dtype for fp32/fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def activation(h: torch.Tensor, act: str) -> torch.Tensor:
    """``act(h)`` with plain ATen ops."""
    if act == "relu":
        return torch.relu(h)
    if act == "silu":
        return F.silu(h)
    return F.gelu(h, approximate="tanh" if act == "gelu_tanh" else "none")


def activation_backward(grad: torch.Tensor, h: torch.Tensor, act: str) -> torch.Tensor:
    """``grad * act'(h)`` with the ATen backward ops."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, h, 0)
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if act == "gelu_tanh" else "none")


def register_act_op(op: CustomOpDef, check: Callable, backward: Callable) -> None:
    """Register the fake and autograd of an ``(a, b, act)`` op whose output is shaped and typed like ``a``.

    ``check(a, b, act)`` validates the fake's arguments; ``backward`` finds ``a, b`` saved and ``ctx.act`` set.
    """

    def fake(a, b, act):
        check(a, b, act)
        return a.new_empty(a.shape)

    def setup(ctx, inputs, output):
        a, b, ctx.act = inputs
        ctx.save_for_backward(a, b)

    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup)


def _check(x: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> int:
    if x.dim() == 0:
        raise ValueError("bias_act: x must have at least one dimension")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_act: bias shape {tuple(bias.shape)} != ({x.shape[-1]},) (the last dim of x)")
    return check_act(act)


def _launch(x: torch.Tensor, bias: Optional[torch.Tensor], act: str, kernel: Any = _bias_act_fwd) -> torch.Tensor:
    code = _check(x, bias, act)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel, n = x.numel(), x.shape[-1]
    if numel:
        x2 = x.reshape(-1, n)
        kernel[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
            x2, bias, y, x2.stride(0), x2.stride(1), 0 if bias is None else bias.stride(0), numel, n,
            HAS_BIAS=bias is not None, ACT=code,
        )
    return y


def bias_act_triton(x: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """Launch the Triton kernel directly: ``act(x + bias)`` in fp32, output in ``x``'s dtype."""
    return _launch(x, bias, act)


def reference(x: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """Plain PyTorch definition: ``act(x + bias)`` computed in fp32 (fp64 for fp64 inputs), cast to ``x.dtype``."""
    _check(x, bias, act)
    h = x.to(compute_dtype(x))
    if bias is not None:
        h = h + bias.to(h.dtype)
    return activation(h, act).to(x.dtype).contiguous()


@triton_op("dsx::bias_act", mutates_args=())
def _bias_act_op(x: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    if use_triton(x) and x.dtype in TRITON_DTYPES:
        return _launch(x, bias, act, wrap_triton(_bias_act_fwd))
    return reference(x, bias, act)


def _backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
    x, bias = ctx.saved_tensors
    h = x.to(compute_dtype(x))
    if bias is not None:
        h = h + bias.to(h.dtype)
    dh = activation_backward(grad.to(h.dtype), h, ctx.act)
    dbias = dh.reshape(-1, h.shape[-1]).sum(0).to(bias.dtype) if ctx.needs_input_grad[1] else None
    return dh.to(x.dtype), dbias, None


register_act_op(_bias_act_op, _check, _backward)


def bias_act(x: torch.Tensor, bias: Optional[torch.Tensor], act: str = "gelu") -> torch.Tensor:
    """``act(x + bias)`` with ``bias`` (shape ``[x.shape[-1]]``, or None) added over the last dim.

    ``act`` is one of "gelu" (erf), "gelu_tanh", "silu", "relu"; computed in fp32, returned in ``x``'s dtype.
    """
    return torch.ops.dsx.bias_act(x, bias, act)
