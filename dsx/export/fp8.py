"""ONNX export form of dsx fp8 linears: float8 e4m3 QDQ (opset >= 19) on the row-wise activation and the
per-channel weight, then a float matmul; ``torch._scaled_mm`` itself has no ONNX translation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.kernels.quantize_fp8 import quantize_fp8_rowwise
from dsx.quant.linear import FP8Linear


class FP8QDQLinear(nn.Module):
    """``FP8Linear`` as ``dsx::quantize_fp8_rowwise`` (a per-row float8 ``QuantizeLinear`` in ONNX), the float8
    values times their scales, and the float8 weight times its per-channel scales."""

    def __init__(self, src: FP8Linear) -> None:
        super().__init__()
        self.register_buffer("weight", src.weight)
        self.register_buffer("weight_scale", src.weight_scale)
        self.register_buffer("bias", src.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_fp8_rowwise(x.reshape(-1, x.shape[-1]))
        w = self.weight.float() * self.weight_scale[:, None]
        y = F.linear(q.float() * scale, w, None if self.bias is None else self.bias.float())
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
