"""``int4_weight_only``: group-wise asymmetric 4-bit weights (scale and zero per ``group_size`` input columns) with
float activations, and the data-free ways to choose them: round-to-nearest and half-quadratic (HQQ) optimization.

GPTQ (calibrated) lives in ``dsx.quant.gptq``; every algorithm yields the same ``(q, scale, zero)`` this layer holds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from dsx.kernels.int4_mm import cpu_pack, dequantize_int4, int4_cpu, int4_weight_only_mm, pack_int4
from dsx.quant.linear import QuantLinear, eager_cpu, linear_weight

QMAX = 15
ALGORITHMS = ("hqq", "gptq", "rtn")
HQQ_ITERS = 20
HQQ_P = 0.7
HQQ_BETA = 10.0
HQQ_KAPPA = 1.01


def minmax_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters: per group of ``w`` [N, K], ``scale = (max - min) / 15`` and the zero that maps
    the minimum to code 0 (both float32 [N, K / group_size]); the range always includes 0."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1).clamp(max=0.0), g.amax(-1).clamp(min=0.0)
    scale = ((hi - lo) / QMAX).clamp_min(1e-10)
    return scale, torch.round(-lo / scale).clamp_(0, QMAX)


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 codes [N, K]: ``clamp(round(w / scale + zero), 0, 15)`` per group."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp_(0, QMAX)
    return q.to(torch.uint8).reshape(w.shape)


def _shrink(x: torch.Tensor, beta: float) -> torch.Tensor:
    """The generalized soft-thresholding operator of the l_p (p < 1) proximal step."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-8).pow(HQQ_P - 1) / beta)


def hqq_params(w: torch.Tensor, group_size: int, iters: int = HQQ_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-quadratic quantization (no data): starting from round-to-nearest, alternate the codes, a sparse l_p
    (p = 0.7) error term that absorbs outliers, and a least-squares fit of each group's scale and zero to the
    weight minus that error; keeps the iterate with the lowest weight reconstruction error.

    Args:
        w: float weight [N, K] (K divisible by ``group_size``).
        group_size: input columns per group.
        iters: optimization steps (it stops early when the error rises).

    Returns:
        ``(scale, zero)``, float32 [N, K / group_size]; the zero may be fractional.
    """
    g = w.float().reshape(w.shape[0], -1, group_size)
    scale, zero = minmax_params(w, group_size)
    s, z = scale[..., None], zero[..., None]

    def codes(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.round(g / s + z).clamp_(0, QMAX)

    def error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ((codes(s, z) - z) * s - g).pow(2).sum(-1, keepdim=True)

    best = error(s, z)
    beta = HQQ_BETA
    for _ in range(iters):
        q = codes(s, z)
        target = g - _shrink(g - (q - z) * s, beta)
        qc = q - q.mean(-1, keepdim=True)
        var = qc.pow(2).sum(-1, keepdim=True)
        slope = (qc * target).sum(-1, keepdim=True) / var.clamp_min(1e-12)
        ok = (var > 0) & (slope > 0)
        new_s = torch.where(ok, slope, s)
        new_z = torch.where(ok, q.mean(-1, keepdim=True) - target.mean(-1, keepdim=True) / new_s, z)
        err = error(new_s, new_z)
        better = err < best
        if not better.any():
            break
        s, z, best = torch.where(better, new_s, s), torch.where(better, new_z, z), torch.where(better, err, best)
        beta *= HQQ_KAPPA
    return s[..., 0], z[..., 0]


def _repack_after_load(module: Int4WeightOnlyLinear, incompatible_keys: Any) -> None:
    module.repack()


class Int4WeightOnlyLinear(QuantLinear):
    """``int4_weight_only`` (W4A16): ``qweight`` uint8 [out, in / 2] (two codes per byte), ``scale`` and ``zero``
    float32 [out, in / group_size], ``bias``; the weight is ``(q - zero) * scale``. On the CPU a copy packed for
    ``_weight_int4pack_mm_for_cpu`` (``packed``, ``scales_zeros``; not saved) is rebuilt whenever the weights are
    loaded, so ``state_dict`` holds only the portable form."""

    format = "int4_weight_only"
    description = "group-wise asymmetric int4 weights, float activations"
    weight_dtype = torch.uint8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype: torch.dtype = torch.float32,
                 device: Any = None, group_size: int = 128) -> None:
        nn.Module.__init__(self)  # the int8 base buffers (weight, weight_scale) do not apply
        if in_features % group_size or in_features % 2:
            raise ValueError(f"group_size: {group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zero", torch.full((out_features, groups), 8.0, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("scales_zeros", None, persistent=False)
        self.register_load_state_dict_post_hook(_repack_after_load)

    @classmethod
    def from_float(cls, module: nn.Module, *, group_size: int = 128, algorithm: str = "hqq") -> Int4WeightOnlyLinear:
        """Quantize an ``nn.Linear`` (or Hugging Face ``Conv1D``) without data (``algorithm`` "hqq" or "rtn")."""
        if algorithm not in ("hqq", "rtn"):
            raise ValueError(f"algorithm: from_float quantizes without data ('hqq' or 'rtn'), got {algorithm!r}")
        w = linear_weight(module)[0]
        scale, zero = hqq_params(w, group_size) if algorithm == "hqq" else minmax_params(w, group_size)
        return cls.from_quantized(module, quantize_groups(w, scale, zero, group_size), scale, zero, group_size)

    @classmethod
    def from_quantized(cls, module: nn.Module, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       group_size: int) -> Int4WeightOnlyLinear:
        """The layer holding codes ``q`` (uint8 [out, in] in 0..15), ``scale`` and ``zero`` for ``module``'s weight."""
        w, b = linear_weight(module)
        layer = cls(w.shape[1], w.shape[0], b is not None, dtype=w.dtype, device=w.device, group_size=group_size)
        layer.qweight = pack_int4(q).to(w.device)
        layer.scale, layer.zero = scale.float().to(w.device), zero.float().to(w.device)
        if b is not None:
            layer.bias = b.clone()
        return layer.repack()

    def repack(self) -> Int4WeightOnlyLinear:
        """Rebuild the CPU kernel's packed copy from ``qweight`` / ``scale`` / ``zero``."""
        self.packed, self.scales_zeros = cpu_pack(self.qweight, self.scale, self.zero)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Int4WeightOnlyLinear:
        super()._apply(fn, recurse)
        return self.repack()  # the packed copy exists only on the CPU

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scale, self.zero)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._rows(x)
        if eager_cpu(x):
            return int4_cpu(x, self.qweight, self.scale, self.zero, self.group_size, self.bias, self.packed,
                            self.scales_zeros)
        return int4_weight_only_mm(x, self.qweight, self.scale, self.zero, self.group_size, self.bias, self.packed,
                                   self.scales_zeros)
