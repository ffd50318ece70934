"""The dynamic int8 linear on the CPU as one op, ``dsx::int8_linear_cpu``: the kernels eager CPU layers run, picked by
row count, callable from compiled graphs too, where inductor would otherwise lower the int8 product to an fp32 matmul.

fbgemm's weight packs live here, one per weight tensor, shared by eager and compiled calls: rebuilt when the weight or
its scales change, dropped with the weight. The op is registered through ``torch.library.Library`` rather than
``custom_op``, whose Python dispatch costs about 35 us a call (3 us here): more than a small layer's decode product.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Optional

import torch

from dsx.core.hardware import has_int8_dot
from dsx.kernels.int8_fbgemm import (fbgemm_available, int8_dynamic_mm_fbgemm, int8_w7_mm_fbgemm, prepack,
                                     use_fbgemm)
from dsx.kernels.int8_mm import int8_scaled_mm_cpu
from dsx.kernels.quantize_per_token import quantize_per_token_cpu

_PACKS: dict[int, tuple[Any, ...]] = {}
"""``id(weight)`` -> (a weak reference to the weight, its scales, their versions when packed, the pack)."""


def _drop(key: int, ref: Any) -> None:
    entry = _PACKS.get(key)
    if entry is not None and entry[0] is ref:
        del _PACKS[key]


def fbgemm_pack(weight: torch.Tensor, weight_scale: torch.Tensor) -> Any:
    """fbgemm's pack of the int8 weight [N, K] with its fp32 scales [N] (``prepack``), built on first use and kept
    while the weight lives: the same pack for every call on these tensors until either is changed in place.

    Args:
        weight: int8 [N, K] on the CPU.
        weight_scale: fp32 [N].

    Returns:
        The opaque pack ``quantized::linear_dynamic`` takes.
    """
    key, versions = id(weight), (weight._version, weight_scale._version)
    entry = _PACKS.get(key)
    if entry is not None and entry[0]() is weight and entry[1] is weight_scale and entry[2] == versions:
        return entry[3]
    packed = prepack(weight, weight_scale)
    _PACKS[key] = (weakref.ref(weight, functools.partial(_drop, key)), weight_scale, versions, packed)
    return packed


def int8_linear_cpu(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, absmax: Optional[torch.Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None, seven_bit: bool = False) -> torch.Tensor:
    """``rows`` quantized per token to int8, times the int8 ``weight``, scaled, plus ``bias``: on fbgemm where it is
    the fast kernel for this many rows (every count without int8 dot-product instructions, decode's few rows with
    them), else ``quantize_per_token`` and ``int8_scaled_mm``'s CPU kernels.

    Args:
        rows: a floating [M, K] CPU tensor.
        weight: int8 [N, K], codes in [-127, 127] (in [-63, 63] when ``seven_bit``).
        weight_scale: fp32 [N] per-channel scales.
        bias: a floating [N] tensor or None.
        absmax: optional fp32 [M, 1] per-row maxima to quantize with (a rowwise shard's whole rows').
        out_dtype: the result's dtype (default ``rows``').
        seven_bit: the weight's codes fit 7 bits: fbgemm takes 8-bit activation codes in one pass.

    Returns:
        A new [M, N] tensor of ``out_dtype``.
    """
    out_dtype = out_dtype or rows.dtype
    if use_fbgemm(rows, rows.shape[0]):
        if seven_bit and rows.shape[1] >= 2:
            return int8_w7_mm_fbgemm(rows, fbgemm_pack(weight, weight_scale), bias, out_dtype, absmax)
        if not seven_bit and absmax is None and out_dtype == rows.dtype:
            return int8_dynamic_mm_fbgemm(rows, fbgemm_pack(weight, weight_scale), bias)
    xq, xs = quantize_per_token_cpu(rows, absmax)
    return int8_scaled_mm_cpu(xq, xs, weight.t(), weight_scale, bias, out_dtype)


@torch.compiler.assume_constant_result
def _fbgemm_beats_compiled_int_mm() -> bool:
    """No int8 dot products, fbgemm present (a constant to dynamo, which cannot trace the reading of CPU flags)."""
    return not has_int8_dot() and fbgemm_available()


def compiles_to_op(x: torch.Tensor) -> bool:
    """Whether a layer traced for ``torch.compile`` (not export) on the CPU tensor ``x`` should call
    ``dsx::int8_linear_cpu``: on CPUs without int8 dot products, where inductor's own int8 product is an fp32
    matmul, slower than fbgemm at every size."""
    return (x.device.type == "cpu" and torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and _fbgemm_beats_compiled_int_mm())


_LIB = torch.library.Library("dsx", "FRAGMENT")
_LIB.define("int8_linear_cpu(Tensor rows, Tensor weight, Tensor weight_scale, Tensor? bias, Tensor? absmax, "
            "ScalarType out_dtype, bool seven_bit) -> Tensor")
_LIB.impl("int8_linear_cpu", int8_linear_cpu, "CPU")


@torch.library.register_fake("dsx::int8_linear_cpu", lib=_LIB)
def _(rows, weight, weight_scale, bias, absmax, out_dtype, seven_bit):
    return rows.new_empty((rows.shape[0], weight.shape[0]), dtype=out_dtype)
