"""Gated activation (``dsx::gated_act``): ``act(gate) * up``, i.e. SwiGLU ("silu") and GeGLU ("gelu", "gelu_tanh").

Gated MLPs (Llama, Mistral, Gemma) otherwise write ``act(gate)`` to memory only to read it back for the product.
"""

from typing import Any, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsx.kernels._triton import TRITON_DTYPES, prune_for_interpreter, use_triton
from dsx.kernels.bias_act import (
    ELEMENTWISE_CONFIGS, act_fn, activation, activation_backward, check_act, compute_dtype,
    register_act_op,
)


@triton.autotune(
    configs=ELEMENTWISE_CONFIGS, key=["N", "ACT"],
    prune_configs_by={"early_config_prune": prune_for_interpreter},
)
@triton.jit
def _gated_act_fwd(
    G, U, Y, stride_gm, stride_gn, stride_um, stride_un, numel, N, ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    row, col = offs // N, offs % N
    g = tl.load(G + row * stride_gm + col * stride_gn, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_um + col * stride_un, mask=inb, other=0.0).to(tl.float32)
    tl.store(Y + offs, (act_fn(g, ACT) * u).to(Y.dtype.element_ty), mask=inb)


def _check(gate: torch.Tensor, up: torch.Tensor, act: str) -> int:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"gated_act: gate and up must match, got {tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}"
        )
    if gate.dim() == 0:
        raise ValueError("gated_act: inputs must have at least one dimension")
    return check_act(act)


def _launch(gate: torch.Tensor, up: torch.Tensor, act: str, kernel: Any = _gated_act_fwd) -> torch.Tensor:
    code = _check(gate, up, act)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    numel, n = gate.numel(), gate.shape[-1]
    if numel:
        g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
        kernel[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
            g2, u2, y, g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1), numel, n, ACT=code,
        )
    return y


def gated_act_triton(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """Launch the Triton kernel directly: ``act(gate) * up`` in fp32, output in the inputs' dtype."""
    return _launch(gate, up, act)


def reference(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """Plain PyTorch definition: ``act(gate) * up`` computed in fp32 (fp64 for fp64 inputs), cast back."""
    _check(gate, up, act)
    dtype = compute_dtype(gate)
    return (activation(gate.to(dtype), act) * up.to(dtype)).to(gate.dtype).contiguous()


@triton_op("dsx::gated_act", mutates_args=())
def _gated_act_op(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    if use_triton(gate) and gate.dtype in TRITON_DTYPES:
        return _launch(gate, up, act, wrap_triton(_gated_act_fwd))
    return reference(gate, up, act)


def _backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
    gate, up = ctx.saved_tensors
    dtype = compute_dtype(gate)
    g, u, dy = gate.to(dtype), up.to(dtype), grad.to(dtype)
    dgate = activation_backward(dy * u, g, ctx.act)
    dup = dy * activation(g, ctx.act)
    return dgate.to(gate.dtype), dup.to(up.dtype), None


register_act_op(_gated_act_op, _check, _backward)


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` for two tensors of the same shape and dtype: SwiGLU for "silu", GeGLU for "gelu" /
    "gelu_tanh" ("relu" also accepted); computed in fp32, returned in the inputs' dtype."""
    return torch.ops.dsx.gated_act(gate, up, act)
