"""The CPU W8A8 matmul on fbgemm (``quantized::linear_dynamic`` on weights prepacked once): fast on every x86 CPU with
AVX2, where ``torch._int_mm`` has a fast kernel only with AVX512-VNNI, and the fastest at decode's few rows.

It computes exactly what ``int8_scaled_mm`` does. fbgemm quantizes a float input itself (7-bit codes, so that pairs of
u8 x s8 products cannot overflow int16 without VNNI); the int8 activations are therefore fed as their positive and
negative parts (integers 0..127, fbgemm's codes with ``reduce_range``) with a row of 127s that pins fbgemm's input scale
to exactly 1, and the int32 products of the two halves are subtracted: the same exact integer product, at the cost of
twice the rows (free at decode sizes, where the weight's bytes set the time). Weights with 7-bit codes (``int8_w7``)
need no split: with them no pair of 8-bit products can overflow, so the signed codes go in as they are, one pass; a
single row goes in as it is, fbgemm rounding it over its own 8-bit range.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any, Optional

import torch

from dsx.core.hardware import has_int8_dot
from dsx.kernels.quantize_per_token import AMAX_MIN, CHUNK_ELEMS, QMAX, row_amax

MAX_ROWS_WITH_INT8_DOT = 16
"""With AVX512-VNNI, rows up to this many run fbgemm (ahead at decode sizes), more run ``torch._int_mm``."""
LIFT = 2.0**20
"""Inputs go to fbgemm multiplied by this, its packed weight scales divided by it (exactly: a power of two). fbgemm's
input scale is at least 6.1e-5; lifted, a single row with ``amax >= 7.3e-9`` keeps its own scale ``amax / 127``."""
_LIFT = torch.tensor(LIFT)
"""``LIFT`` as a tensor: a Python scalar operand costs a conversion on every call."""


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


_INPUTS = threading.local()
MAX_KEPT_INPUT = 1 << 24
"""Elements of the largest fbgemm input buffer a thread keeps for reuse (64 MiB); larger ones are allocated per call."""


def _pinned_input(m: int, k: int) -> torch.Tensor:
    """A [m + 1, k] fp32 buffer whose first row has the range [-128, 127] exactly (``k >= 2``): above rows of codes in
    [-127, 127], it pins fbgemm's 8-bit input scale to 1 and its zero point to 128, so every code goes in exactly.
    This thread's buffer for ``k`` is reused (grown as needed): no allocation, page faults or pin copy per call."""
    kept = _INPUTS.__dict__.setdefault("by_k", {})
    buf = kept.get(k)
    if buf is None or buf.shape[0] <= m:
        buf = torch.full((m + 1, k), QMAX, dtype=torch.float32)
        buf[0, 0] = -QMAX - 1.0
        if buf.numel() <= MAX_KEPT_INPUT:
            kept[k] = buf
    return buf[:m + 1]


def _rows_amax(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` of each row of ``x`` [M, K], fp32 [M, 1] clamped to ``AMAX_MIN``: through a temporary ``|x|`` that
    stays in cache (the fewest ops), or ``row_amax`` (no full-size temporary) beyond ``CHUNK_ELEMS`` elements."""
    if x.numel() > CHUNK_ELEMS:
        return row_amax(x)
    return x.abs().amax(-1, keepdim=True).float().clamp_min_(AMAX_MIN)


def _finish(out: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
            out_dtype: torch.dtype) -> torch.Tensor:
    """``out * scale + bias`` as ``out_dtype``, in one pass over ``out``."""
    return (out.mul_(scale) if bias is None else torch.addcmul(bias.float(), out, scale)).to(out_dtype)


def int8_scaled_mm_fbgemm(a: torch.Tensor, a_scale: torch.Tensor, packed: Any, bias: Optional[torch.Tensor] = None,
                          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(a @ W^T) * a_scale * w_scale + bias`` with an exact int32 product, as ``int8_scaled_mm`` computes it.

    Args:
        a: int8 [M, K] with values in [-127, 127] (what ``quantize_per_token`` and the static quantizer produce).
        a_scale: float32 [M, 1] (or broadcast to it), per-row scales.
        packed: ``prepack(w, w_scale)`` of the int8 weight ``W`` [N, K] and its float32 scales [N].
        bias: a floating [N] tensor or None.
        out_dtype: the result's dtype.

    Returns:
        A new [M, N] tensor of ``out_dtype``.
    """
    return _finish(_pinned_mm(a.float(), packed), a_scale * LIFT, bias, out_dtype)


def int8_w7_row_fbgemm(x: torch.Tensor, packed: Any, bias: Optional[torch.Tensor] = None,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``int8_w7_mm_fbgemm`` of one row ``x`` (any leading dims of size 1, the result's too), in the fewest
    operations: fbgemm rounds the row, lifted, over its own 8-bit range."""
    out = torch.ops.quantized.linear_dynamic(torch.mul(x.float(), _LIFT), packed, False)
    return (out if bias is None else out.add_(bias)).to(out_dtype or x.dtype)


def int8_w7_mm_fbgemm(x: torch.Tensor, packed: Any, bias: Optional[torch.Tensor] = None,
                      out_dtype: Optional[torch.dtype] = None, absmax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float rows ``x`` [M, K] (K >= 2) times a weight whose codes lie in [-63, 63] (``int8_w7``), in one fbgemm pass:
    without VNNI fbgemm sums pairs of u8 x s8 products in int16, which 8-bit activations overflow with 8-bit weights,
    never with 7-bit ones (``2 * 255 * 63 < 2**15``).

    Several rows get ``quantize_per_token``'s codes, written as integer-valued floats straight into fbgemm's input
    below a pinned row (so fbgemm's own rounding, after adding its zero point, keeps them): the exact integer product
    of ``int8_scaled_mm``. A single row without ``absmax`` (decode) goes in as it is, in the fewest operations: fbgemm
    quantizes it to 8 bits over its own range ``[min(x, 0), max(x, 0)]`` (asymmetric, a step at most the symmetric
    code's), lifted so that small rows keep their range.

    Args:
        x: a floating [M, K] tensor.
        packed: ``prepack(w, w_scale)`` of the int8 weight ``W`` [N, K] with codes in [-63, 63].
        bias: a floating [N] tensor or None.
        out_dtype: the result's dtype (default ``x``'s).
        absmax: optional fp32 [M, 1] per-row maxima to quantize with, as ``quantize_per_token`` takes them.

    Returns:
        A new [M, N] tensor: ``x @ (W * w_scale)^T + bias`` up to the rows' 8-bit rounding.
    """
    m, k = x.shape
    if m == 1 and absmax is None:
        return int8_w7_row_fbgemm(x, packed, bias, out_dtype)
    amax = _rows_amax(x) if absmax is None else absmax.float().clamp_min(AMAX_MIN)
    codes = _pinned_input(m, k)
    q = torch.mul(x, QMAX / amax, out=codes[1:]).round_()
    if absmax is not None:
        q.clamp_(-QMAX, QMAX)
    product = torch.ops.quantized.linear_dynamic(codes, packed, False)[1:]
    return _finish(product, torch.div(amax, QMAX / LIFT), bias, out_dtype or x.dtype)


def int8_dynamic_mm_fbgemm(x: torch.Tensor, packed: Any, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``quantize_per_token`` then ``int8_scaled_mm_fbgemm`` in fewer operations, fbgemm doing the rounding: the same
    codes (but for the rounding of ``x * 127 / amax`` against ``x / (amax / 127)``) and scales for float rows ``x``
    [M, K]. A single row (decode) goes in as it is: fbgemm's input range is then the row's own (lifted) ``amax``.
    Returns ``x.dtype`` [M, N]."""
    if x.shape[0] == 1:
        signs, difference = _one_row_constants()
        halves = torch.mul(x, signs).relu_()  # [2, K] by broadcasting
        y = torch.ops.quantized.linear_dynamic(halves, packed, True)
        return (torch.mm(difference, y) if bias is None else torch.addmm(bias.float(), difference, y)).to(x.dtype)
    amax = _rows_amax(x)
    return _finish(_pinned_mm(torch.mul(x, QMAX / amax), packed), (amax / QMAX).mul_(LIFT), bias, x.dtype)


@functools.lru_cache(maxsize=None)
def _one_row_constants() -> tuple[torch.Tensor, torch.Tensor]:
    """``[[-LIFT], [LIFT]]``, the lifted negative and positive parts of a row in that order, and ``[[-1, 1]]``, whose
    product with fbgemm's two output rows is their difference (one exact rounding, as a subtraction)."""
    return torch.tensor([[-LIFT], [LIFT]]), torch.tensor([[-1.0, 1.0]])
