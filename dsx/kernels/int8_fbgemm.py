"""The CPU W8A8 matmul on fbgemm (``quantized::linear_dynamic`` on weights prepacked once): fast on every x86 CPU with
AVX2, where ``torch._int_mm`` has a fast kernel only with AVX512-VNNI, and the fastest at decode's few rows.

It computes exactly what ``int8_scaled_mm`` does. fbgemm quantizes a float input itself (7-bit codes, so that pairs of
u8 x s8 products cannot overflow int16 without VNNI); the int8 activations are therefore fed as their positive and
negative parts (integers 0..127, fbgemm's codes with ``reduce_range``) with a row of 127s that pins fbgemm's input scale
to exactly 1, and the int32 products of the two halves are subtracted: the same exact integer product, at the cost of
twice the rows (free at decode sizes, where the weight's bytes set the time). Weights with 7-bit codes (``int8_w7``)
need no split: with them no pair of 8-bit products can overflow, so the signed codes go in as they are, one pass.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch

from dsx.core.hardware import has_int8_dot
from dsx.kernels.quantize_per_token import AMAX_MIN, QMAX

MAX_ROWS_WITH_INT8_DOT = 16
"""With AVX512-VNNI, rows up to this many run fbgemm (ahead at decode sizes), more run ``torch._int_mm``."""
LIFT = 2.0**20
"""Inputs go to fbgemm multiplied by this, its packed weight scales divided by it (exactly: a power of two). fbgemm's
input scale is at least 6.1e-5; lifted, a single row with ``amax >= 7.3e-9`` keeps its own scale ``amax / 127``."""


@functools.lru_cache(maxsize=None)
def fbgemm_available() -> bool:
    """Whether this torch build has fbgemm's dynamic quantized linear (x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def use_fbgemm(x: torch.Tensor, rows: int) -> bool:
    """Whether ``rows`` rows of the CPU tensor ``x`` run fbgemm rather than ``torch._int_mm``: always without int8
    dot-product instructions, up to ``MAX_ROWS_WITH_INT8_DOT`` rows with them."""
    return (x.device.type == "cpu" and fbgemm_available()
            and (not has_int8_dot() or rows <= MAX_ROWS_WITH_INT8_DOT))


def prepack(w: torch.Tensor, w_scale: torch.Tensor) -> Any:
    """fbgemm's packed form of the symmetric per-channel int8 weight ``w`` [N, K] with fp32 scales ``w_scale`` [N]
    (held as ``w_scale / LIFT``; an opaque object: kept beside the layer's plain buffers, never saved)."""
    zeros = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch flags quantized tensors as deprecated; this one lives only for the pack
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(w.cpu(), w_scale.cpu().double() / LIFT, zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def _pinned_mm(v: torch.Tensor, packed: Any) -> torch.Tensor:
    """``round(v) @ W^T * w_scale / LIFT`` (fp32 [M, N]) for fp32 rows ``v`` [M, K] that round to codes in
    [-127, 127]: fbgemm rounds and multiplies their negative and positive parts, pinned to an input scale of exactly
    1 by a last row of 127s, and the two products are subtracted."""
    m = v.shape[0]
    y = torch.ops.quantized.linear_dynamic(torch.cat((v.neg(), v, v.new_full((1, v.shape[1]), QMAX))).relu_(),
                                           packed, True)
    return torch.sub(y[m:2 * m], y[:m])


@functools.lru_cache(maxsize=64)
def _pin_row(k: int) -> torch.Tensor:
    """A row of ``k`` values whose range is exactly [-128, 127] (``k >= 2``): appended to rows of codes in [-127, 127],
    it pins fbgemm's 8-bit input scale to 1 and its zero point to 128, so every code goes in exactly."""
    row = torch.full((1, k), float(QMAX))
    row[0, 0] = -QMAX - 1.0
    return row


def _pinned_signed_mm(a: torch.Tensor, packed: Any) -> torch.Tensor:
    """``a @ W^T * w_scale / LIFT`` (fp32 [M, N]) for int8 codes ``a`` [M, K] (K >= 2) and a weight whose codes lie
    in [-63, 63], in one pass: without VNNI fbgemm sums pairs of u8 x s8 products in int16, which 8-bit activations
    (shifted to 1..255) overflow with 8-bit weights, never with 7-bit ones (``2 * 255 * 63 < 2**15``). The codes go
    in as integer-valued floats under a pinned row, so fbgemm's rounding (after adding its zero point) is exact."""
    m, k = a.shape
    codes = torch.empty((m + 1, k), dtype=torch.float32)
    codes[:m] = a
    codes[m:] = _pin_row(k)
    return torch.ops.quantized.linear_dynamic(codes, packed, False)[:m]


def _finish(out: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    return (out if bias is None else out.add_(bias)).to(out_dtype)


def int8_scaled_mm_fbgemm(a: torch.Tensor, a_scale: torch.Tensor, packed: Any, bias: Optional[torch.Tensor] = None,
                          out_dtype: torch.dtype = torch.float32, seven_bit_weight: bool = False) -> torch.Tensor:
    """``(a @ W^T) * a_scale * w_scale + bias`` with an exact int32 product, as ``int8_scaled_mm`` computes it.

    Args:
        a: int8 [M, K] with values in [-127, 127] (what ``quantize_per_token`` and the static quantizer produce).
        a_scale: float32 [M, 1] (or broadcast to it), per-row scales.
        packed: ``prepack(w, w_scale)`` of the int8 weight ``W`` [N, K] and its float32 scales [N].
        bias: a floating [N] tensor or None.
        out_dtype: the result's dtype.
        seven_bit_weight: ``W``'s codes lie in [-63, 63] (``int8_w7``): one fbgemm pass instead of two (K >= 2).

    Returns:
        A new [M, N] tensor of ``out_dtype``.
    """
    product = _pinned_signed_mm(a, packed) if seven_bit_weight else _pinned_mm(a.float(), packed)
    return _finish(product.mul_(a_scale * LIFT), bias, out_dtype)


def int8_dynamic_mm_fbgemm(x: torch.Tensor, packed: Any, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``quantize_per_token`` then ``int8_scaled_mm_fbgemm`` in fewer operations, fbgemm doing the rounding: the same
    codes (but for the rounding of ``x * 127 / amax`` against ``x / (amax / 127)``) and scales for float rows ``x``
    [M, K]. A single row (decode) goes in as it is: fbgemm's input range is then the row's own (lifted) ``amax``.
    Returns ``x.dtype`` [M, N]."""
    if x.shape[0] == 1:
        signs, difference = _one_row_constants()
        halves = torch.mul(x, signs).relu_()  # [2, K] by broadcasting
        return _finish(torch.mm(difference, torch.ops.quantized.linear_dynamic(halves, packed, True)), bias, x.dtype)
    amax = x.abs().amax(-1, keepdim=True).float().clamp_min_(AMAX_MIN)
    out = _pinned_mm(torch.mul(x, QMAX / amax), packed).mul_((amax / QMAX).mul_(LIFT))
    return _finish(out, bias, x.dtype)


@functools.lru_cache(maxsize=None)
def _one_row_constants() -> tuple[torch.Tensor, torch.Tensor]:
    """``[[-LIFT], [LIFT]]``, the lifted negative and positive parts of a row in that order, and ``[[-1, 1]]``, whose
    product with fbgemm's two output rows is their difference (one exact rounding, as a subtraction)."""
    return torch.tensor([[-LIFT], [LIFT]]), torch.tensor([[-1.0, 1.0]])
