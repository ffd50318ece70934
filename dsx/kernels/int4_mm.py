"""Int4 weight-only matmul ``dsx::int4_weight_only_mm``: a float activation times an asymmetric, group-quantized
4-bit weight. Decode reads every weight once per token, so 4-bit weights read an eighth of fp32's bytes.

Storage (the portable form, ONNX ``MatMulNBits``' layout): ``qweight`` uint8 [N, K / 2] with column ``2j`` in the low
nibble and ``2j + 1`` in the high one; ``scale`` and ``zero`` float32 [N, K / group_size]; the weight is
``(q - zero) * scale`` per group of ``group_size`` input columns. On CUDA the Triton GEMM unpacks and dequantizes
inside the K loop; on the CPU few rows run ATen's ``_weight_int4pack_mm_for_cpu`` (bf16 activations) on a copy of the
weight packed once (``cpu_pack``), more rows dequantize chunk by chunk into ``F.linear``.
"""

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsx.kernels._triton import TRITON_DTYPES, use_triton
from dsx.kernels.int8_mm import GEMM_CONFIGS, m_bucket, prune_gemm_configs, tile_offsets
from dsx.kernels.quantize_per_token import chunk_rows

GROUP_SIZES = (32, 64, 128, 256)
PACK_BLOCK_ROWS = 16
"""Rows per call of the packed CPU kernel: up to 16 rows it costs ~40 us per row for 1024 x 2816, above that it
switches to a path ~8x slower per row (2 threads), so more rows run as blocks of 16."""
PACK_MAX_ROWS = 256
"""Most rows run through the packed CPU kernel; above it, dequantizing once into ``F.linear`` costs less per row
(its fixed cost, ~3 ms for 1024 x 2816, is then amortized)."""


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15 [N, K] (K even) -> two per byte [N, K / 2], column ``2j`` in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: [N, K / 2] bytes -> uint8 codes [N, K]."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] that ``(qweight, scale, zero)`` stand for, computed in fp32, returned as ``dtype``."""
    n, groups = scale.shape
    q = unpack_int4(qweight).view(n, groups, -1).float()
    return ((q - zero[..., None]) * scale[..., None]).view(n, -1).to(dtype)


def cpu_pack(qweight: torch.Tensor, scale: torch.Tensor,
             zero: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The operands of ``_weight_int4pack_mm_for_cpu`` (its packed weight and bf16 ``[K / g, N, 2]`` scales and
    zeros, whose convention is ``(q - 8) * scale + zero``), or ``(None, None)`` where the CPU kernel does not apply
    (another device, N not a multiple of 16)."""
    if qweight.device.type != "cpu" or qweight.shape[0] % 16:
        return None, None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qweight).to(torch.int32), 1)
    scales_zeros = torch.stack([scale, (8.0 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_zeros.to(torch.bfloat16)


INT4_CONFIGS = [c for c in GEMM_CONFIGS if c.kwargs["BLOCK_K"] <= 128]


@triton.autotune(
    configs=INT4_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "HAS_BIAS", "IEEE"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)
@triton.jit
def _int4_weight_only_mm_fwd(
    X, QW, S, Z, BIAS, Y, M, N, K, M_BUCKET, GROUP,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_bias,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    col = rn[None, :].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + rk[:, None]
        mask_w = (kk < K) & (rn[None, :] < N)
        x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0.0)
        byte = tl.load(QW + col * stride_qn + (kk // 2) * stride_qk, mask=mask_w, other=0)
        q = ((byte >> ((kk % 2) * 4).to(tl.uint8)) & 15).to(tl.float32)
        g = kk // GROUP
        s = tl.load(S + col * stride_sn + g * stride_sg, mask=mask_w, other=0.0)
        z = tl.load(Z + col * stride_sn + g * stride_sg, mask=mask_w, other=0.0)
        w = ((q - z) * s).to(x.dtype)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
    if HAS_BIAS:
        acc += tl.load(BIAS + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _check(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
           bias: Optional[torch.Tensor]) -> None:
    if not x.dtype.is_floating_point or x.dim() == 0:
        raise ValueError(f"int4_weight_only_mm: x must be a floating [..., K] tensor, got {x.dtype}")
    k = x.shape[-1]
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or 2 * qweight.shape[1] != k:
        raise ValueError(f"int4_weight_only_mm: qweight must be uint8 [N, {k // 2}] (two codes per byte, "
                         f"K = x.shape[-1] = {k}), got {tuple(qweight.shape)} {qweight.dtype}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"int4_weight_only_mm: group_size must divide K = {k}, got {group_size}")
    want = (qweight.shape[0], k // group_size)
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != want or t.dtype != torch.float32:
            raise ValueError(f"int4_weight_only_mm: {name} must be float32 {list(want)}, got {tuple(t.shape)} "
                             f"{t.dtype}")
    if bias is not None and (tuple(bias.shape) != (want[0],) or not bias.dtype.is_floating_point):
        raise ValueError(f"int4_weight_only_mm: bias must be a floating [{want[0]}] tensor, got {tuple(bias.shape)} "
                         f"{bias.dtype}")


def _launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
            bias: Optional[torch.Tensor], kernel: Any = _int4_weight_only_mm_fwd) -> torch.Tensor:
    _check(x, qweight, scale, zero, group_size, bias)
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            x2, qweight, scale, zero, bias, y, m, n, k, m_bucket(m), group_size,
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1),
            0 if bias is None else bias.stride(0), HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        )
    return y.view(*x.shape[:-1], n)


def int4_weight_only_mm_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                               group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the Triton kernel directly (any device under ``TRITON_INTERPRET=1``): the weight is unpacked and
    dequantized in registers, accumulated in fp32 (fp32 ``x`` without TF32)."""
    return _launch(x, qweight, scale, zero, group_size, bias)


def int4_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch definition: ``F.linear(x, (q - zero) * scale, bias)`` in fp32 (fp64 for fp64 ``x``)."""
    _check(x, qweight, scale, zero, group_size, bias)
    ct = torch.promote_types(x.dtype, torch.float32)
    w = dequantize_int4(qweight, scale, zero, ct)
    return F.linear(x.to(ct), w, None if bias is None else bias.to(ct)).to(x.dtype)


def _dequantized_linear(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` on the weight dequantized to ``x2.dtype``; in eager mode a chunk of output features at a time,
    so the whole float weight never exists."""
    bias = None if bias is None else bias.to(x2.dtype)
    n, k = qweight.shape[0], x2.shape[1]
    if torch.compiler.is_compiling():
        return F.linear(x2, dequantize_int4(qweight, scale, zero, x2.dtype), bias)
    y = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    step = chunk_rows(k)
    for s in range(0, n, step):
        w = dequantize_int4(qweight[s:s + step], scale[s:s + step], zero[s:s + step], x2.dtype)
        y[:, s:s + step] = F.linear(x2, w, None if bias is None else bias[s:s + step])
    return y


def int4_cpu(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
             bias: Optional[torch.Tensor], packed: Optional[torch.Tensor],
             scales_zeros: Optional[torch.Tensor]) -> torch.Tensor:
    """The CPU (and any non-Triton) implementation: the packed kernel in bf16 for up to ``PACK_MAX_ROWS`` rows (in
    blocks of ``PACK_BLOCK_ROWS``), else dequantize into ``F.linear``."""
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if packed is not None and x.device.type == "cpu" and m <= PACK_MAX_ROWS:
        xb = x2.to(torch.bfloat16).contiguous()
        if m <= PACK_BLOCK_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_zeros).to(x.dtype)
        else:
            y = torch.empty((m, n), dtype=x.dtype, device=x.device)
            for r in range(0, m, PACK_BLOCK_ROWS):
                y[r:r + PACK_BLOCK_ROWS] = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xb[r:r + PACK_BLOCK_ROWS], packed, group_size, scales_zeros)
        y = y if bias is None else y.add_(bias)
    else:
        y = _dequantized_linear(x2, qweight, scale, zero, bias)
    return y.view(*x.shape[:-1], n)


@triton_op("dsx::int4_weight_only_mm", mutates_args=())
def _int4_weight_only_mm_op(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
    bias: Optional[torch.Tensor], packed: Optional[torch.Tensor], scales_zeros: Optional[torch.Tensor],
) -> torch.Tensor:
    _check(x, qweight, scale, zero, group_size, bias)
    if use_triton(x) and x.dtype in TRITON_DTYPES:
        return _launch(x, qweight, scale, zero, group_size, bias, wrap_triton(_int4_weight_only_mm_fwd))
    return int4_cpu(x, qweight, scale, zero, group_size, bias, packed, scales_zeros)


@_int4_weight_only_mm_op.register_fake
def _(x, qweight, scale, zero, group_size, bias, packed, scales_zeros):
    _check(x, qweight, scale, zero, group_size, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup(ctx, inputs, output):
    x, qweight, scale, zero, group_size, bias, _, _ = inputs
    ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
    ctx.save_for_backward(qweight, scale, zero)


def _backward(ctx, grad: torch.Tensor):
    qweight, scale, zero = ctx.saved_tensors
    ct = torch.promote_types(ctx.x_dtype, torch.float32)
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        dx = (grad.to(ct) @ dequantize_int4(qweight, scale, zero, ct)).to(ctx.x_dtype)
    if ctx.needs_input_grad[5]:
        dbias = grad.reshape(-1, qweight.shape[0]).sum(0, dtype=ct).to(ctx.bias_dtype)
    return dx, None, None, None, None, dbias, None, None


_int4_weight_only_mm_op.register_autograd(_backward, setup_context=_setup)


def int4_weight_only_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        group_size: int, bias: Optional[torch.Tensor] = None, packed: Optional[torch.Tensor] = None,
                        scales_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16 linear: ``F.linear(x, (q - zero) * scale, bias)`` for a group-quantized 4-bit weight.

    Args:
        x: fp32, bf16 or fp16 activations [..., K] (fp64 runs the dequantizing path).
        qweight: uint8 [N, K / 2], two codes per byte (``pack_int4``).
        scale: float32 [N, K / group_size] group scales.
        zero: float32 [N, K / group_size] group zero points (may be fractional).
        group_size: input columns per group; divides K.
        bias: a floating [N] tensor or None.
        packed, scales_zeros: ``cpu_pack``'s operands, for the fast CPU path with few rows (None: dequantize).

    Returns:
        ``x.dtype`` [..., N]. The packed CPU path computes in bf16 (its error is the bf16 rounding of ``x`` and the
        scales); CUDA accumulates in fp32. Gradients flow to ``x`` and ``bias``; the weight is a constant.

    Raises:
        ValueError: shapes or dtypes that do not fit together.
    """
    return torch.ops.dsx.int4_weight_only_mm(x, qweight, scale, zero, group_size, bias, packed, scales_zeros)
