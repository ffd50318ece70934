"""Quantization-aware training: float linears that fake-quantize weights and activations with straight-through
gradients and learned scales (LSQ), and ``convert`` to the real int8 modules with those scales.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from dsx.core.modules import is_hf_conv1d
from dsx.quant.linear import (
    Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear, QuantLinear, linear_weight,
)

QMAX = 127.0
TARGETS: dict[str, type[QuantLinear]] = {c.format: c for c in (Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear)}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scaled(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """``scale`` forward with its gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    return scale * factor + (scale - scale * factor).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 fake quantization ``clamp(round(x / scale), -127, 127) * scale``; gradients reach both
    ``x`` (straight through inside the range) and ``scale`` (LSQ)."""
    return torch.clamp(round_ste(x / scale), -QMAX, QMAX) * scale


def _carry_parametrizations(src: nn.Module, qat: nn.Module) -> None:
    """Re-register ``src``'s weight parametrizations (pruning / 2:4 masks) on ``qat`` so the zeros stay zero while
    training; a ``mask`` of a Hugging Face ``Conv1D`` (stored ``[in, out]``) is transposed to ``[out, in]``."""
    if not parametrize.is_parametrized(src, "weight"):
        return
    for p in src.parametrizations.weight:
        p = copy.deepcopy(p)
        if is_hf_conv1d(src) and isinstance(getattr(p, "mask", None), torch.Tensor):
            p.mask = p.mask.t().contiguous()
        parametrize.register_parametrization(qat, "weight", p)


class QATLinear(nn.Module):
    """A linear layer trained with int8 fake quantization; ``to_quantized()`` gives the matching dsx int8 module.

    ``format`` is ``"int8"`` (activations fake-quantized per token at run time), ``"int8_static"`` (one learned
    activation scale, initialised from calibration or the first batch) or ``"int8_weight_only"``. The weight
    scale per output channel is learned in every format.
    """

    formats: ClassVar[tuple[str, ...]] = tuple(TARGETS)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, format: str) -> None:
        super().__init__()
        if format not in self.formats:
            raise ValueError(f"format: QAT supports {list(self.formats)}, got {format!r}")
        self.format = format
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        amax = weight.detach().float().abs().amax(dim=1).clamp_min(1e-12)
        self.weight_scale = nn.Parameter(amax / QMAX)
        self.input_scale = nn.Parameter(torch.zeros(())) if format == "int8_static" else None

    @classmethod
    def from_float(cls, module: nn.Module, format: str, input_amax: float | None = None) -> QATLinear:
        """Wrap an ``nn.Linear`` (or Hugging Face ``Conv1D``); ``input_amax`` seeds the static activation scale."""
        w, b = linear_weight(module)
        qat = cls(w, b, format)
        if input_amax is not None and qat.input_scale is not None:
            qat.input_scale.data.fill_(max(input_amax, 1e-12) / QMAX)
        _carry_parametrizations(module, qat)
        return qat

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format} (fake-quantized for training)")

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the int8 module will see it (fake-quantized with the learned per-channel scale)."""
        scale = grad_scaled(self.weight_scale.abs().clamp_min(1e-12), 1.0 / math.sqrt(self.in_features * QMAX))
        return fake_quantize(self.weight, scale[:, None].to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == "int8":
            scale = (x.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / QMAX).to(x.dtype)
            x = fake_quantize(x, scale)
        elif self.format == "int8_static":
            if self.input_scale.item() == 0.0:
                with torch.no_grad():
                    self.input_scale.fill_(x.detach().abs().amax().float().clamp_min(1e-12).item() / QMAX)
            scale = grad_scaled(self.input_scale.abs().clamp_min(1e-12), 1.0 / math.sqrt(x.numel() * QMAX))
            x = fake_quantize(x, scale.to(x.dtype))
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def to_quantized(self) -> QuantLinear:
        """The real int8 module with the learned scales: integer weights ``clamp(round(w / scale))``."""
        cls = TARGETS[self.format]
        q = cls(self.in_features, self.out_features, self.bias is not None, dtype=self.weight.dtype,
                device=self.weight.device)
        scale = self.weight_scale.detach().abs().clamp_min(1e-12).float()
        q.weight = torch.round(self.weight.detach().float() / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        q.weight_scale = scale.clone()
        if self.bias is not None:
            q.bias = self.bias.detach().clone()
        if self.input_scale is not None:
            q.input_scale = self.input_scale.detach().abs().clamp_min(1e-12).float().clone()
        return q
