"""Fused bias add + activation (``dsx::bias_act``): ``act(x + bias)`` with the bias over the last dim.

Fusing the Linear bias into its GELU/SiLU/ReLU epilogue reads and writes the activation once instead of twice.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsx.kernels._triton import prune_for_interpreter, use_triton

ACTS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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


def _check(x: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> int:
    if x.dim() == 0:
        raise ValueError("bias_act: x must have at least one dimension")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_act: bias shape {tuple(bias.shape)} != ({x.shape[-1]},) (the last dim of x)")
    return check_act(act)


def _launch(x: torch.Tensor, bias: Optional[torch.Tensor], act: str, wrap: Callable = lambda k: k) -> torch.Tensor:
    code = _check(x, bias, act)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel, n = x.numel(), x.shape[-1]
    if numel:
        x2 = x.reshape(-1, n)
        wrap(_bias_act_fwd)[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
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
    if use_triton(x) and x.dtype in _TRITON_DTYPES:
        return _launch(x, bias, act, wrap_triton)
    return reference(x, bias, act)


@_bias_act_op.register_fake
def _(x, bias, act):
    _check(x, bias, act)
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    x, bias, ctx.act = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
    x, bias = ctx.saved_tensors
    h = x.to(compute_dtype(x))
    if bias is not None:
        h = h + bias.to(h.dtype)
    dh = activation_backward(grad.to(h.dtype), h, ctx.act)
    dbias = dh.reshape(-1, h.shape[-1]).sum(0).to(bias.dtype) if ctx.needs_input_grad[1] else None
    return dh.to(x.dtype), dbias, None


_bias_act_op.register_autograd(_backward, setup_context=_setup)


def bias_act(x: torch.Tensor, bias: Optional[torch.Tensor], act: str = "gelu") -> torch.Tensor:
    """``act(x + bias)`` with ``bias`` (shape ``[x.shape[-1]]``, or None) added over the last dim.

    ``act`` is one of "gelu" (erf), "gelu_tanh", "silu", "relu"; computed in fp32, returned in ``x``'s dtype.
    """
    return torch.ops.dsx.bias_act(x, bias, act)
