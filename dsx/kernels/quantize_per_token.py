"""Dynamic per-token int8 quantization (``dsx::quantize_per_token``): symmetric, one fp32 scale per row.

Int8 GEMMs need their activations quantized on every call; one kernel finds each row's absmax (or takes a given one,
the full row's when ``x`` is one rank's slice of it) and quantizes it.
"""

from typing import Any, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsx.kernels._triton import ROW_CONFIGS, TRITON_DTYPES, next_pow2, prune_row_configs, use_triton

QMAX = 127
AMAX_MIN = 1e-12
MAX_BLOCK = 4096
CHUNK_ELEMS = 1 << 20
SMALL_ROWS = 16
"""Up to this many rows (decode), the CPU path quantizes in one go with the fewest ATen calls."""
"""Elements per chunk of the CPU paths: a 4 MiB fp32 temporary stays in cache and is reused by the allocator, where a
full-size one is page-faulted in on every call (about 8x slower for a 4096 x 3072 fp32 input on 2 threads)."""


@triton.jit
def round_half_even(y):
    """Round an fp32 block with ``|y| <= 2**22`` to the nearest integer, ties to even (as ``torch.round``).

    Adding and subtracting 1.5 * 2**23 leaves no fraction bits, so the fp32 add itself rounds (to nearest even).
    """
    return (y + 12582912.0) - 12582912.0


@triton.jit
def row_absmax(x_row, stride_xn, N, amax_min, BLOCK: tl.constexpr):
    """``max(max |x_row[:N]|, amax_min)`` in fp32, reading the row in BLOCK-wide steps."""
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        c = start + cols
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + c * stride_xn, mask=c < N, other=0.0).to(tl.float32)))
    return tl.maximum(tl.max(amax, axis=0), amax_min)


@triton.autotune(configs=ROW_CONFIGS, key=["BLOCK"], prune_configs_by={"early_config_prune": prune_row_configs})
@triton.jit
def _quantize_per_token_fwd(X, Q, S, stride_xm, stride_xn, N, amax_min, A, HAS_AMAX: tl.constexpr,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    cols = tl.arange(0, BLOCK)
    if HAS_AMAX:
        amax = tl.maximum(tl.load(A + row).to(tl.float32), amax_min)
    else:
        amax = row_absmax(x_row, stride_xn, N, amax_min, BLOCK)
    tl.store(S + row, tl.math.div_rn(amax, 127.0))
    inv = tl.math.div_rn(1.0, amax) * 127.0  # how torch evaluates ``127 / amax``: reciprocal, then multiply
    for start in range(0, N, BLOCK):
        c = start + cols
        x = tl.load(x_row + c * stride_xn, mask=c < N, other=0.0).to(tl.float32)
        # Clamping before rounding also keeps the product from being contracted into an fma with the rounding add.
        q = round_half_even(tl.minimum(tl.maximum(x * inv, -127.0), 127.0))
        tl.store(Q + row * N + c, q.to(tl.int8), mask=c < N)


def chunk_rows(cols: int) -> int:
    """Rows per chunk of ``CHUNK_ELEMS`` elements (at least one) for the CPU paths that loop over row chunks."""
    return max(1, CHUNK_ELEMS // max(cols, 1))


def row_amax(x2: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the last dim of a 2-D tensor, as fp32 ``[rows, 1]`` clamped to ``AMAX_MIN``.

    ``max(amax, -amin)`` reads ``x`` twice but allocates no full-size ``|x|``, which is far faster on the CPU.
    """
    amax = torch.maximum(x2.amax(-1, keepdim=True), x2.amin(-1, keepdim=True).neg_())
    return amax.float().clamp_min_(AMAX_MIN)


def check_quantize_input(name: str, x: torch.Tensor) -> None:
    """ValueError unless ``x`` is fp32/bf16/fp16 with at least one dim and a non-empty last dim."""
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"{name}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x must have at least one dimension and a non-empty last dim, got {tuple(x.shape)}")


def scale_shape(x: torch.Tensor) -> Tuple[int, ...]:
    """Shape of the per-row scale of ``x``: ``x.shape[:-1] + (1,)``."""
    return (*x.shape[:-1], 1)


def check_absmax(name: str, x: torch.Tensor, absmax: Optional[torch.Tensor]) -> None:
    """ValueError unless ``absmax`` is None or a floating tensor of ``scale_shape(x)`` on ``x``'s device."""
    if absmax is None:
        return
    if not absmax.is_floating_point() or tuple(absmax.shape) != scale_shape(x) or absmax.device != x.device:
        raise ValueError(f"{name}: absmax must be a floating tensor of shape {scale_shape(x)} on {x.device} (one "
                         f"value per row of x), got {absmax.dtype} of shape {tuple(absmax.shape)} on {absmax.device}")


def launch_rowwise(name: str, x: torch.Tensor, kernel: Any, qdtype: torch.dtype,
                   absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run a one-program-per-row quantize kernel ``kernel(X, Q, S, stride_xm, stride_xn, N, amax_min, A, HAS_AMAX,
    BLOCK)`` (``A``: the given per-row maxima, read when ``HAS_AMAX``): ``(q`` of ``qdtype`` shaped like ``x``, fp32
    ``scale`` of ``scale_shape(x))``."""
    check_quantize_input(name, x)
    check_absmax(name, x, absmax)
    n = x.shape[-1]
    q = torch.empty(x.shape, dtype=qdtype, device=x.device)
    scale = torch.empty(scale_shape(x), dtype=torch.float32, device=x.device)
    x2 = x.reshape(-1, n)
    given = absmax is not None
    if x2.shape[0]:
        kernel[(x2.shape[0],)](
            x2, q, scale, x2.stride(0), x2.stride(1), n, AMAX_MIN, absmax.reshape(-1).contiguous() if given else x2,
            HAS_AMAX=given, BLOCK=min(next_pow2(n), MAX_BLOCK),
        )
    return q, scale


def _launch(x: torch.Tensor, absmax: Optional[torch.Tensor] = None,
            kernel: Any = _quantize_per_token_fwd) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_rowwise("quantize_per_token", x, kernel, torch.int8, absmax)


def quantize_per_token_triton(x: torch.Tensor,
                              absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel directly: ``(q, scale)`` as in ``reference``."""
    return _launch(x, absmax)


def reference(x: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch definition, in fp32: ``amax = max(|x|, 1e-12)`` per row (``max(absmax, 1e-12)`` when given),
    ``scale = amax / 127`` and ``q = round(x * (127 / amax))`` (half to even) clamped to [-127, 127] as int8."""
    check_quantize_input("quantize_per_token", x)
    check_absmax("quantize_per_token", x, absmax)
    xf = x.float()
    amax = (xf.abs().amax(-1, keepdim=True) if absmax is None else absmax.float()).clamp_min(AMAX_MIN)
    q = torch.round(xf * (QMAX / amax)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, amax / QMAX


def _quantize_aten(x: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``reference`` without full-size fp32 temporaries (in eager mode): chunk by chunk of rows, the row maxima and
    the rounded product, so each chunk is read from memory once and then from cache.

    With the rows' own maxima ``|x * (127 / amax)| <= 127 (1 + 2**-23)**3 < 127.5``, so the rounded values need no
    clamp; a given ``absmax`` may be below a row's maximum, and then they are clamped.
    """
    check_quantize_input("quantize_per_token", x)
    check_absmax("quantize_per_token", x, absmax)
    x2 = x.reshape(-1, x.shape[-1])
    given = None if absmax is None else absmax.reshape(-1, 1).float().clamp_min(AMAX_MIN)

    def quantize(rows: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        q = torch.mul(rows, QMAX / amax).round_()
        return q if given is None else q.clamp_(-QMAX, QMAX)

    if x2.shape[0] <= SMALL_ROWS and not torch.compiler.is_compiling():  # decode: fewest ops, |x| is tiny here
        amax = x2.abs().amax(-1, keepdim=True).float().clamp_min_(AMAX_MIN) if given is None else given
        return quantize(x2, amax).to(torch.int8).contiguous().view(x.shape), (amax / QMAX).view(scale_shape(x))
    if torch.compiler.is_compiling():
        amax = row_amax(x2) if given is None else given
        return quantize(x2, amax).to(torch.int8).view(x.shape), (amax / QMAX).view(scale_shape(x))
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    step = chunk_rows(x2.shape[1])
    for s in range(0, x2.shape[0], step):
        amax = row_amax(x2[s:s + step]) if given is None else given[s:s + step]
        torch.div(amax, QMAX, out=scale[s:s + step])
        q[s:s + step] = quantize(x2[s:s + step], amax)
    return q.view(x.shape), scale.view(scale_shape(x))


@triton_op("dsx::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: torch.Tensor,
                           absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _launch(x, absmax, wrap_triton(_quantize_per_token_fwd))
    return _quantize_aten(x, absmax)


@_quantize_per_token_op.register_fake
def _(x, absmax=None):
    check_quantize_input("quantize_per_token", x)
    check_absmax("quantize_per_token", x, absmax)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(scale_shape(x), dtype=torch.float32)


def quantize_per_token_cpu(x: torch.Tensor,
                           absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op's CPU kernel called directly, skipping the custom-op dispatch (tens of microseconds, which is most of
    a decode step's quantization): for eager CPU callers only; the same results as ``quantize_per_token``."""
    return _quantize_aten(x, absmax)


def quantize_per_token(x: torch.Tensor,
                       absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization of each row (last dim) of ``x`` (fp32, bf16 or fp16, any leading dims).

    Args:
        x: the activations.
        absmax: optional per-row maximum magnitude of shape ``x.shape[:-1] + (1,)`` to quantize with instead of the
            rows' own (e.g. the full row's, all-reduced, when ``x`` is one rank's slice of its features: the codes
            are then those of the full row); values beyond it clamp to +-127.

    Returns:
        ``(q, scale)``: ``q`` int8 shaped like ``x`` with ``x ~= q * scale``, ``scale`` fp32 of shape
        ``x.shape[:-1] + (1,)`` equal to ``max(amax, 1e-12) / 127``, ``amax`` the row's ``max |x|`` or ``absmax``.
        Computed in fp32; rounding is half to even.

    Raises:
        ValueError: ``x`` is not fp32 / bf16 / fp16 with a non-empty last dim, or ``absmax`` is not a floating tensor
            of shape ``x.shape[:-1] + (1,)`` on ``x``'s device.
    """
    return torch.ops.dsx.quantize_per_token(x, absmax)
