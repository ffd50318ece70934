"""``dsx.quantize`` on the test device for every format of the registry that builds dsx quantized layers (int8, int8_w7,
int8_static, int8_weight_only, int4_weight_only; fp8 and fp8_weight_only from compute capability 8.9): each layer's
output against its own float64 definition (the dequantized weight for weight-only formats, the exact integer or fp8
product of the quantized activations otherwise), the model's output against the float model's, and all formats in one
``torch.compile`` graph against eager."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsx
from dsx.kernels import quantize_fp8, quantize_per_token
from dsx.quant.config import QuantConfig, resolve_config
from dsx.quant.int4 import Int4WeightOnlyLinear
from dsx.quant.linear import (FP8Linear, FP8WeightOnlyLinear, Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear,
                              fp8_supported)
from tests.cuda.cuda_testing import (DEVICE, MLP, ON_CUDA, TOL, cosine, needs_device,
                                     rel_err, require_capability)

pytestmark = needs_device

FORMATS = ("int8", "int8_w7", "int8_static", "int8_weight_only", "int4_weight_only", "fp8", "fp8_weight_only")
FP8_FORMATS = ("fp8", "fp8_weight_only")
DTYPES = (torch.float32, torch.bfloat16)
EMULATION_TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
"""Against an emulation of activation-quantized layers: their codes may differ from the emulation's by one at rare
rounding ties (and, for bf16 activations, wherever the bf16 input rounds differently than fp32 would)."""
FP8_TOL = 2e-2
"""fp8 layers: CUDA's row-wise ``torch._scaled_mm`` writes bf16 (with fast accumulation) whatever the input dtype."""
MIN_COSINE = {"int4_weight_only": 0.98}
"""Least cosine similarity of the quantized model's output to the float model's (0.99 for formats not named): int4
weights of this random MLP give about 0.992 over its two layers."""


class Bundle(nn.Module):
    """Several models side by side, so that one compiled graph runs them all."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x):
        return tuple(m(x) for m in self.models)


def _skip_unsupported(fmt: str) -> None:
    if fmt in FP8_FORMATS:
        require_capability(quantize_fp8.FP8_MIN_CAPABILITY, f"the {fmt} format")
        if fmt == "fp8" and (reason := fp8_supported(DEVICE)) is not None:
            pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def _build(fmt: str, dtype: torch.dtype):
    """(float model, quantized model, example input) on DEVICE in ``dtype``, the same weights for every format."""
    gen = torch.Generator().manual_seed(0)
    model = MLP()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    model = model.to(DEVICE, dtype).eval()
    x = torch.randn(8, 128, generator=gen).to(DEVICE, dtype)
    calibration = [torch.randn(8, 128, generator=gen).to(DEVICE, dtype), x] if fmt == "int8_static" else None
    q = dsx.quantize(model, fmt, example_inputs=x, calibration=calibration, progress=False)
    return model, q, x


def _layer_reference(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The float64 output ``layer`` stands for on ``inp``, by its format's definition."""
    bias = None if layer.bias is None else layer.bias.detach().cpu().double()
    inp = inp.detach().cpu()
    if isinstance(layer, (Int8WeightOnlyLinear, Int4WeightOnlyLinear, FP8WeightOnlyLinear)):
        return F.linear(inp.double(), layer.dequantize().cpu().double(), bias)
    w, ws = layer.weight.cpu().double(), layer.weight_scale.cpu().double()
    if isinstance(layer, Int8Linear):
        xq, xs = quantize_per_token.reference(inp)
    elif isinstance(layer, Int8StaticLinear):
        rows = inp.float() if layer.smooth is None else inp.float() * layer.smooth.cpu()
        scale = layer.input_scale.cpu()
        xq, xs = (rows / scale).round().clamp(-127, 127), scale.expand(rows.shape[0], 1)
    elif isinstance(layer, FP8Linear):
        xq, xs = quantize_fp8.reference(inp)
    else:
        raise AssertionError(f"no reference for {type(layer).__name__}")
    out = (xq.double() @ w.t()) * xs.double() * ws
    return out if bias is None else out + bias


def _layer_tol(layer: nn.Module, dtype: torch.dtype) -> float:
    if isinstance(layer, FP8Linear):
        return FP8_TOL
    if isinstance(layer, (Int8Linear, Int8StaticLinear)):
        return EMULATION_TOL[dtype]
    if isinstance(layer, Int4WeightOnlyLinear) and not ON_CUDA:
        return TOL[torch.bfloat16]  # the CPU int4 kernel (_weight_int4pack_mm_for_cpu) computes in bf16
    return TOL[dtype]


def test_formats_cover_the_registry():
    built = {name for name, cls in QuantConfig.registry.items() if cls.linear is not None}
    assert built == set(FORMATS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_layers_match_their_definition(fmt, dtype):
    _skip_unsupported(fmt)
    model, q, x = _build(fmt, dtype)
    linear_cls = resolve_config(fmt).linear
    layers = {"up": q.up, "down": q.down}
    assert all(type(m) is linear_cls for m in layers.values()), {n: type(m).__name__ for n, m in layers.items()}
    assert all(b.device.type == DEVICE.type for b in q.buffers())
    seen = {}
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, m in layers.items()]
    try:
        with torch.no_grad():
            out, ref = q(x), model(x)
    finally:
        for h in hooks:
            h.remove()
    assert out.dtype == dtype and out.device.type == DEVICE.type and out.shape == ref.shape
    for name, layer in layers.items():
        inp, got = seen[name]
        assert got.dtype == dtype
        err = rel_err(got, _layer_reference(layer, inp))
        assert err < _layer_tol(layer, dtype), f"{fmt} {name}: relative error {err:.3g}"
    assert cosine(out, ref) >= MIN_COSINE.get(fmt, 0.99)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_format_compiled_matches_eager(dtype):
    fmts = []
    for fmt in FORMATS:
        try:
            _skip_unsupported(fmt)
        except pytest.skip.Exception:
            continue
        fmts.append(fmt)
    built = [_build(fmt, dtype) for fmt in fmts]
    bundle = Bundle([q for _, q, _ in built]).eval()
    x = built[0][2]
    assert all(torch.equal(b[2], x) for b in built)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = bundle(x)
        compiled = torch.compile(bundle, fullgraph=True)(x)
        floats = [model(x) for model, _, _ in built]
    for fmt, got, want, ref in zip(fmts, compiled, eager, floats):
        assert got.dtype == dtype and got.shape == want.shape
        err, tol = rel_err(got, want), FP8_TOL if fmt == "fp8" else EMULATION_TOL[dtype]
        assert err < tol, f"{fmt}: relative error {err:.3g}"
        assert cosine(got, ref) >= MIN_COSINE.get(fmt, 0.99), fmt
