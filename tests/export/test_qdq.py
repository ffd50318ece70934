"""The QDQ export form: which linears ``qdq_form`` swaps, that the caller's model is untouched, and that the
QuantizeLinear / DequantizeLinear spelling computes what the calibrated int8 linear does."""

import torch
import torch.nn as nn

import dsx
from dsx.export.qdq import StaticQDQLinear, qdq_form
from dsx.quant.linear import Int8StaticLinear


def static_mlp(smoothquant=None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    config = dsx.quant.Int8Static(smoothquant=smoothquant) if smoothquant else "int8_static"
    return dsx.quantize(model, config, calibration=[torch.randn(8, 16) for _ in range(4)], progress=False)


def test_static_linears_are_swapped_in_a_copy():
    model = static_mlp()
    form, n = qdq_form(model)
    assert n == 2 and form is not model
    assert isinstance(form[0], StaticQDQLinear) and isinstance(form[2], StaticQDQLinear)
    assert isinstance(model[0], Int8StaticLinear) and isinstance(model[2], Int8StaticLinear)


def test_models_without_static_or_fp8_linears_come_back_as_they_are():
    plain = nn.Sequential(nn.Linear(4, 4))
    assert qdq_form(plain) == (plain, 0)
    dynamic = dsx.quantize(nn.Sequential(nn.Linear(4, 4)), "int8", progress=False)
    assert qdq_form(dynamic) == (dynamic, 0)


def test_qdq_form_computes_the_int8_static_result():
    for smoothquant in (None, 0.5):
        model = static_mlp(smoothquant)
        form, _ = qdq_form(model)
        x = torch.randn(3, 7, 16)
        with torch.no_grad():
            ref, got = model(x), form(x)
        # x / scale (QuantizeLinear) against x * (1 / scale): a rare activation may round one step apart.
        assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9999
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
