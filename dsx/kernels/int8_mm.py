"""Int8 matmuls: W8A8 ``dsx::int8_scaled_mm`` (scales and bias fused) and W8A16 ``dsx::int8_weight_only_mm``.

Fusing the dequantization into the GEMM keeps int8 weights (and int32 accumulators) out of memory; any M works.
"""

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsx.core.hardware import has_int8_dot
from dsx.kernels._triton import TRITON_DTYPES, next_pow2, prune_for_interpreter, use_triton
from dsx.kernels.quantize_per_token import chunk_rows

GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        (16, 32, 64, 2, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
        (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    )
]
"""Small-M (decode) tiles first; ``prune_gemm_configs`` drops tiles taller than M needs. The kernels are autotuned
per ``M_BUCKET = m_bucket(M)`` (an argument used only as the key): a new M re-tunes only in a new power-of-two bucket.
"""
PACK_MAX_ROWS = {torch.bfloat16: 32, torch.float32: 1}
"""Most rows for which the CPU ``_weight_int8pack_mm`` beats dequantize + ``F.linear`` (measured on 2 threads: its cost
grows with M, steeply for fp32; for fp16 it is 2-10x slower at any M)."""


def m_bucket(m: Any) -> Any:
    """The autotune key for M: ``next_pow2(M)``. A symbolic M (torch.compile tracing with dynamic shapes, where the
    compiled graph autotunes by itself) passes through unchanged, so that tracing does not specialize it."""
    return next_pow2(m) if isinstance(m, int) else m


IEEE_MAX_TILE = 128 * 128
"""Largest output tile of the fp32 (IEEE, no tensor core) GEMMs: a 256 x 128 fp32 tile spills registers and takes
15-26 s to compile for sm90."""


def prune_gemm_configs(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` hook: keep tiles with ``BLOCK_M <= max(16, next_pow2(M))`` (all of them for a symbolic
    M) and, for fp32 (``IEEE``) GEMMs, tiles of at most ``IEEE_MAX_TILE`` outputs; then prune for the interpreter."""
    m = named_args["M"]
    if isinstance(m, int):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, next_pow2(m))]
    if kwargs.get("IEEE", named_args.get("IEEE")):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= IEEE_MAX_TILE]
    return prune_for_interpreter(configs, named_args)


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of this program's output tile, in groups of ``GROUP_M`` tile rows for L2 reuse."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.autotune(
    configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)
@triton.jit
def _int8_scaled_mm_fwd(
    A, B, AS, BS, BIAS, C, M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_as, stride_bs, stride_bias,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rm, rn = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k) & (rn[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # Triton 3.6 does not infer int32 from acc
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    a_scale = tl.load(AS + rm * stride_as, mask=rm < M, other=0.0)
    b_scale = tl.load(BS + rn * stride_bs, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(
    configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS", "IEEE"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)
@triton.jit
def _int8_weight_only_mm_fwd(
    X, W, WS, BIAS, Y, M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ws, stride_bias,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    w_ptrs = W + rk[:, None] * stride_wk + rn[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0.0)
        w = tl.load(w_ptrs, mask=(rk[:, None] < K - k) & (rn[None, :] < N), other=0).to(x.dtype)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    y = acc * tl.load(WS + rn * stride_ws, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _check_bias(name: str, bias: Optional[torch.Tensor], n: int) -> None:
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.dtype.is_floating_point):
        raise ValueError(f"{name}: bias must be a floating [{n}] tensor, got {tuple(bias.shape)} {bias.dtype}")


def _check_scaled_mm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"int8_scaled_mm: a [M, K] and b [K, N] must be 2-D int8 with the same K, "
            f"got {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}"
        )
    m, n = a.shape[0], b.shape[1]
    if tuple(a_scale.shape) != (m, 1) or a_scale.dtype != torch.float32:
        raise ValueError(
            f"int8_scaled_mm: a_scale must be float32 [{m}, 1], got {tuple(a_scale.shape)} {a_scale.dtype}"
        )
    if tuple(b_scale.shape) != (n,) or b_scale.dtype != torch.float32:
        raise ValueError(f"int8_scaled_mm: b_scale must be float32 [{n}], got {tuple(b_scale.shape)} {b_scale.dtype}")
    _check_bias("int8_scaled_mm", bias, n)
    if out_dtype not in TRITON_DTYPES:
        raise ValueError(f"int8_scaled_mm: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def _launch_scaled_mm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype, kernel: Any = _int8_scaled_mm_fwd,
) -> torch.Tensor:
    _check_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype)
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m and n:
        kernel[_grid(m, n)](
            a, b, a_scale, b_scale, bias, c, m, n, k, m_bucket(m),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), a_scale.stride(0), b_scale.stride(0),
            0 if bias is None else bias.stride(0), HAS_BIAS=bias is not None,
        )
    return c


def int8_scaled_mm_triton(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch the Triton kernel directly: ``(a @ b) * a_scale * b_scale + bias`` as in ``scaled_mm_reference``."""
    return _launch_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype)


def scaled_mm_reference(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Plain PyTorch definition: the exact integer product (float64 holds it), then ``* a_scale * b_scale + bias`` in
    fp32, cast to ``out_dtype``."""
    _check_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype)
    y = (a.double() @ b.double()).float() * a_scale * b_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _no_broadcast(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if a dim of size > 1 has stride 0: the CPU ``torch._int_mm`` gives wrong results for those."""
    return t.contiguous() if any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride())) else t


def _epilogue_(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``acc * a_scale * b_scale + bias`` written over the int32 ``acc``'s memory, returned as fp32.

    The in-place int32 -> fp32 copy then fp32-only ops run ~10x faster on the CPU than a mixed int32 x fp32 multiply,
    and no new output is allocated (page faults on fresh buffers cost as much as the arithmetic). Chunks of rows keep
    the four passes in cache: one trip through memory instead of four.
    """
    y = acc.view(torch.float32)
    step = chunk_rows(acc.shape[1])
    for s in range(0, acc.shape[0], step):
        chunk = y[s:s + step]
        chunk.copy_(acc[s:s + step]).mul_(a_scale[s:s + step]).mul_(b_scale)
        if bias is not None:
            chunk.add_(bias)
    return y


def _compiled_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The int8 product in a compiled CPU graph: ``torch._int_mm`` where the CPU has int8 dot products; elsewhere
    (AVX2) its scalar loop runs tens of times slower than an fp32 matmul, so the codes are multiplied as fp32 (exact
    while partial sums stay below 2**24, else within fp32 rounding), at about fp32 speed."""
    if a.device.type != "cpu" or has_int8_dot():
        return torch._int_mm(a, b)
    return torch.mm(a.float(), b.float())


def _scaled_mm_aten(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``torch._int_mm`` and the fp32 epilogue in place on its int32 product; for a 16-bit ``out_dtype`` in eager mode
    chunk by chunk of rows, so that no full-size int32 product is materialized beside the output."""
    _check_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype)
    a, b = _no_broadcast(a), _no_broadcast(b)
    if torch.compiler.is_compiling():
        y = _compiled_int_mm(a, b) * a_scale * b_scale
        return (y if bias is None else y + bias.float()).to(out_dtype)
    m, n = a.shape[0], b.shape[1]
    if out_dtype == torch.float32:
        return _epilogue_(torch._int_mm(a, b), a_scale, b_scale, bias)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    step = chunk_rows(n)
    for s in range(0, m, step):
        out[s:s + step] = _epilogue_(torch._int_mm(a[s:s + step], b), a_scale[s:s + step], b_scale, bias)
    return out


@triton_op("dsx::int8_scaled_mm", mutates_args=())
def _int8_scaled_mm_op(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if use_triton(a):
        return _launch_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype, wrap_triton(_int8_scaled_mm_fwd))
    return _scaled_mm_aten(a, a_scale, b, b_scale, bias, out_dtype)


@_int8_scaled_mm_op.register_fake
def _(a, a_scale, b, b_scale, bias, out_dtype):
    _check_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def _scaled_mm_setup(ctx, inputs, output):
    bias = inputs[4]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _scaled_mm_backward(ctx, grad: torch.Tensor) -> Tuple[None, None, None, None, Optional[torch.Tensor], None]:
    dbias = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[4] else None
    return None, None, None, None, dbias, None


_int8_scaled_mm_op.register_autograd(_scaled_mm_backward, setup_context=_scaled_mm_setup)


def int8_scaled_mm_cpu(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The op's CPU kernel called directly, skipping the custom-op dispatch: for eager CPU callers (decode, where the
    dispatch costs as much as the matmul); the same results as ``int8_scaled_mm``."""
    return _scaled_mm_aten(a, a_scale, b, b_scale, bias, out_dtype)


def int8_scaled_mm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 matmul: ``(a @ b) * a_scale * b_scale + bias`` with an exact int32 product, the rest in fp32.

    ``a`` int8 [M, K] with per-row ``a_scale`` float32 [M, 1] (as ``quantize_per_token`` returns), ``b`` int8 [K, N]
    of any strides (typically ``w.t()`` of an int8 [N, K] weight) with per-column ``b_scale`` float32 [N], ``bias``
    a floating [N] tensor or None. Returns a new contiguous [M, N] tensor of ``out_dtype`` (fp32, bf16 or fp16).
    Gradients flow to ``bias`` only.
    """
    return torch.ops.dsx.int8_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype)


def _check_weight_only(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if not x.dtype.is_floating_point or x.dim() == 0:
        raise ValueError(f"int8_weight_only_mm: x must be a floating [..., K] tensor, got {x.dtype}")
    if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"int8_weight_only_mm: w must be int8 [N, {x.shape[-1]}] (K = x.shape[-1]), got {tuple(w.shape)} {w.dtype}"
        )
    n = w.shape[0]
    if tuple(w_scale.shape) != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(
            f"int8_weight_only_mm: w_scale must be float32 [{n}], got {tuple(w_scale.shape)} {w_scale.dtype}"
        )
    _check_bias("int8_weight_only_mm", bias, n)


def _launch_weight_only(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
    kernel: Any = _int8_weight_only_mm_fwd,
) -> torch.Tensor:
    _check_weight_only(x, w, w_scale, bias)
    (n, k) = w.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        kernel[_grid(m, n)](
            x2, w, w_scale, bias, y, m, n, k, m_bucket(m),
            x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), w_scale.stride(0),
            0 if bias is None else bias.stride(0), HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        )
    return y.view(*x.shape[:-1], n)


def int8_weight_only_mm_triton(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Launch the Triton kernel directly: ``F.linear(x, w * w_scale[:, None], bias)`` with the weight dequantized in
    registers, accumulated and scaled in fp32."""
    return _launch_weight_only(x, w, w_scale, bias)


def weight_only_reference(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Plain PyTorch definition: ``F.linear(x, w * w_scale[:, None], bias)`` in fp32 (fp64 for fp64 inputs), cast to
    ``x.dtype``."""
    _check_weight_only(x, w, w_scale, bias)
    ct = torch.promote_types(x.dtype, torch.float32)
    y = F.linear(x.to(ct), w.to(ct) * w_scale.to(ct)[:, None], None if bias is None else bias.to(ct))
    return y.to(x.dtype)


def _dequantized_linear(
    x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``F.linear(x2, w * w_scale[:, None], bias)`` with the weight dequantized to ``x2.dtype``.

    In eager mode with fewer rows than K, chunk by chunk of output features: the strided copies of the output chunks
    then cost less than allocating the whole dequantized weight (6x faster for 4096 x 4096 and M = 1 on 2 threads).
    """
    bias = None if bias is None else bias.to(x2.dtype)
    (n, k) = w.shape
    if torch.compiler.is_compiling() or x2.shape[0] > k:
        return F.linear(x2, torch.mul(w, w_scale[:, None]).to(x2.dtype), bias)
    y = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    step = chunk_rows(k)
    for s in range(0, n, step):
        w_chunk = torch.mul(w[s:s + step], w_scale[s:s + step, None]).to(x2.dtype)
        y[:, s:s + step] = F.linear(x2, w_chunk, None if bias is None else bias[s:s + step])
    return y


def _weight_only_aten(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``_weight_int8pack_mm`` (eager CPU, few rows, K a multiple of 16: it crashes otherwise) or dequantize +
    ``F.linear`` (also under torch.compile, whose CPU lowering of ``_weight_int8pack_mm`` refuses computed scales).

    Both round to ``x.dtype`` first: the scales (``_weight_int8pack_mm``) or the dequantized weight (``F.linear``).
    """
    _check_weight_only(x, w, w_scale, bias)
    (n, k) = w.shape
    x2 = x.reshape(-1, k)
    few_rows = x.dtype in PACK_MAX_ROWS and x2.shape[0] <= PACK_MAX_ROWS[x.dtype]
    if x.device.type == "cpu" and few_rows and k % 16 == 0 and not torch.compiler.is_compiling():
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w.contiguous(), w_scale.to(x.dtype))
        y = y if bias is None else y.add_(bias)
    else:
        y = _dequantized_linear(x2, w, w_scale, bias)
    return y.view(*x.shape[:-1], n)


@triton_op("dsx::int8_weight_only_mm", mutates_args=())
def _int8_weight_only_mm_op(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    if use_triton(x) and x.dtype in TRITON_DTYPES:
        return _launch_weight_only(x, w, w_scale, bias, wrap_triton(_int8_weight_only_mm_fwd))
    return _weight_only_aten(x, w, w_scale, bias)


@_int8_weight_only_mm_op.register_fake
def _(x, w, w_scale, bias):
    _check_weight_only(x, w, w_scale, bias)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _weight_only_setup(ctx, inputs, output):
    x, w, w_scale, bias = inputs
    ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
    ctx.save_for_backward(w, w_scale)


def _weight_only_backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, Optional[torch.Tensor]]:
    w, w_scale = ctx.saved_tensors
    ct = torch.promote_types(ctx.x_dtype, torch.float32)
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        dx = (grad.to(ct) @ (w.to(ct) * w_scale.to(ct)[:, None])).to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        dbias = grad.reshape(-1, w.shape[0]).sum(0, dtype=ct).to(ctx.bias_dtype)
    return dx, None, None, dbias


_int8_weight_only_mm_op.register_autograd(_weight_only_backward, setup_context=_weight_only_setup)


def int8_weight_only_mm(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """W8A16 linear: ``F.linear(x, w * w_scale[:, None], bias)`` for an int8 weight with per-output-channel scales.

    ``x`` fp32, bf16 or fp16 (fp64 runs ATen ops) [..., K]; ``w`` int8 [N, K]; ``w_scale`` float32 [N]; ``bias`` a
    floating [N] tensor or None. Returns ``x.dtype`` [..., N]. On CUDA the weight is dequantized inside the GEMM (fp32
    accumulation, fp32 x without TF32); on the CPU the result matches up to the rounding of the weight or scales to
    ``x.dtype``. Gradients flow to ``x`` and ``bias``; the int8 weight and its scales are constants.
    """
    return torch.ops.dsx.int8_weight_only_mm(x, w, w_scale, bias)
