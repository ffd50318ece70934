"""QDQ export form of calibrated int8 linears: QuantizeLinear / DequantizeLinear pairs that onnxruntime and TensorRT
fuse into integer GEMMs, built from torch's ``quantized_decomposed`` ops (which the ONNX exporter translates).
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.export.fp8 import FP8QDQLinear
from dsx.quant.linear import FP8Linear, Int8StaticLinear
from dsx.core.modules import set_module


def _ops() -> Any:
    importlib.import_module("torch.ao.quantization.fx._decomposed")  # registers torch.ops.quantized_decomposed
    return torch.ops.quantized_decomposed


class StaticQDQLinear(nn.Module):
    """``Int8StaticLinear`` spelled as Q -> DQ on the activation (its calibrated scale, after SmoothQuant's
    ``smooth`` factors) and DQ on the per-channel int8 weight, then a float linear."""

    def __init__(self, src: Int8StaticLinear) -> None:
        super().__init__()
        self.input_scale = float(src.input_scale)
        self.register_buffer("weight", src.weight)
        self.register_buffer("weight_scale", src.weight_scale)
        self.register_buffer("zero_points", torch.zeros_like(src.weight_scale, dtype=torch.long))
        self.register_buffer("bias", src.bias)
        self.register_buffer("smooth", src.smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _ops()
        h = x.float() if self.smooth is None else x.float() * self.smooth
        q = ops.quantize_per_tensor(h, self.input_scale, 0, -127, 127, torch.int8)
        h = ops.dequantize_per_tensor(q, self.input_scale, 0, -127, 127, torch.int8)
        w = ops.dequantize_per_channel(self.weight, self.weight_scale, self.zero_points, 0, -127, 127, torch.int8)
        return F.linear(h, w, None if self.bias is None else self.bias.float()).to(x.dtype)


EXPORT_FORMS: dict[type[nn.Module], type[nn.Module]] = {Int8StaticLinear: StaticQDQLinear, FP8Linear: FP8QDQLinear}


def qdq_form(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every ``Int8StaticLinear`` and ``FP8Linear`` in its QDQ export form (the model itself
    when there is none), and how many were replaced."""
    names = [n for n, m in model.named_modules() if type(m) in EXPORT_FORMS]
    if not names:
        return model, 0
    model = copy.deepcopy(model)
    for name in names:
        module = model.get_submodule(name)
        model = set_module(model, name, EXPORT_FORMS[type(module)](module))
    return model, len(names)
