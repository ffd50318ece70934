import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import dsx.quant.linear as quant_linear
from dsx.kernels import int8_linear_cpu
from dsx.kernels.int8_fbgemm import fbgemm_available
from dsx.kernels.int8_linear_cpu import fbgemm_pack
from dsx.quant.linear import (FP8, FP8Linear, FP8WeightOnlyLinear, Int8Linear, Int8StaticLinear, Int8W7Linear,
                              Int8WeightOnlyLinear, fp8_supported, is_linear, linear_weight, quantize_weight,
                              scaled_mm_options)

ALL = [Int8Linear, Int8W7Linear, Int8WeightOnlyLinear, FP8Linear, FP8WeightOnlyLinear]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(64, 48)


def test_int8_weight_quantization_is_within_half_a_step():
    w = torch.randn(32, 40) * torch.logspace(-2, 1, 32)[:, None]
    q, scale = quantize_weight(w, torch.int8)
    assert q.dtype == torch.int8 and scale.shape == (32,) and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(1) == 127).all()


def test_7_bit_weight_codes_are_within_half_a_step():
    w = torch.randn(32, 40) * torch.logspace(-2, 1, 32)[:, None]
    q, scale = Int8W7Linear.quantize_weight(w)
    assert q.dtype == torch.int8 and (q.abs().amax(1) == 63).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_fp8_weight_quantization_is_close():
    w = torch.randn(16, 32)
    q, scale = quantize_weight(w, FP8)
    assert q.dtype == FP8
    assert ((q.float() * scale[:, None] - w).abs() / w.abs().amax(1, keepdim=True)).max() < 0.07


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.format)
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (1, 64)])
def test_close_to_float(cls, shape, linear):
    if cls is FP8Linear and fp8_supported(torch.device("cpu")) is not None:
        pytest.skip("torch._scaled_mm has no CPU fp8 path in this torch")
    x = torch.randn(*shape)
    q = cls.from_float(linear)
    out = q(x)
    assert out.shape == (*shape[:-1], 48) and out.dtype == torch.float32
    assert cosine(out, linear(x).detach()) > (0.999 if "int8" in cls.format else 0.995)


def use_fbgemm(monkeypatch, on):
    """Force the fbgemm kernels on or off (off: ``torch._int_mm``) for every int8 layer."""
    for module in (quant_linear, int8_linear_cpu):
        monkeypatch.setattr(module, "use_fbgemm", lambda x, rows: on)


def test_int8_linear_matches_an_exact_integer_computation(linear, monkeypatch):
    use_fbgemm(monkeypatch, False)
    x = torch.randn(9, 64)
    q = Int8Linear.from_float(linear)
    amax = x.abs().amax(1, keepdim=True)
    xq = torch.round(x * (127 / amax)).clamp(-127, 127)
    ref = (xq.double() @ q.weight.double().t()) * (amax.double() / 127) * q.weight_scale.double() + linear.bias.double()
    assert torch.allclose(q(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no fbgemm")
@pytest.mark.parametrize("cls", [Int8Linear, Int8W7Linear, Int8StaticLinear], ids=lambda c: c.format)
def test_fbgemm_and_aten_paths_agree(cls, linear, monkeypatch):
    q = cls.from_float(linear)
    x = torch.randn(2, 5, 64)
    use_fbgemm(monkeypatch, False)
    ref, ref_one = q(x), q(x[0, :1])
    use_fbgemm(monkeypatch, True)
    assert torch.allclose(q(x), ref, rtol=1e-5, atol=1e-5)
    one = q(x[0, :1])  # one row: the fewest-operations path (int8_w7's rounds over the row's own 8-bit range)
    if cls is Int8W7Linear:
        assert cosine(one, linear(x[0, :1]).detach()) > 0.9995 and torch.allclose(one, ref_one, atol=0.05)
    else:
        assert torch.allclose(one, ref_one, rtol=1e-5, atol=1e-5)
    q.weight.mul_(-1)  # an in-place change of the weight repacks
    assert torch.allclose(q(x), 2 * q.bias - ref, rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(q)  # a copy packs its own weight
    assert torch.equal(twin(x), q(x))
    assert fbgemm_pack(twin.weight, twin.weight_scale) is not fbgemm_pack(q.weight, q.weight_scale)


@pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no fbgemm")
@pytest.mark.parametrize("cls", [Int8Linear, Int8W7Linear], ids=lambda c: c.format)
def test_a_decode_row_runs_straight_on_the_pack_and_keeps_every_guard(cls, linear, monkeypatch):
    q = cls.from_float(linear)
    row = torch.randn(1, 1, 64)
    with torch.no_grad():
        calls = []
        monkeypatch.setattr(q, "fbgemm_row", lambda *a: calls.append(a) or cls.fbgemm_row(q, *a))
        first = q(row)
        assert calls and first.shape == (1, 1, 48) and torch.equal(q(row), first)
        assert cosine(first, linear(row)) > 0.999
        assert calls[0][1] is calls[1][1] is fbgemm_pack(q.weight, q.weight_scale)  # packed once
        q.weight.mul_(-1)  # changed in place: the stale pack is not used, the weight is packed again
        calls.clear()
        assert torch.allclose(q(row), 2 * q.bias - first, rtol=1e-5, atol=1e-5)
        assert calls and calls[0][1] is fbgemm_pack(q.weight, q.weight_scale)
        assert q(row.bfloat16()).dtype == torch.bfloat16
        with pytest.raises(ValueError, match="expected 64"):
            q(torch.randn(1, 1, 32))
    x = row.clone().requires_grad_()  # autograd: the straight-through path, not the fast one
    calls.clear()
    q(x).sum().backward()
    assert not calls and x.grad is not None and x.grad.shape == x.shape


def test_bf16_activations_keep_their_dtype(linear):
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    for cls in (Int8Linear, Int8W7Linear, Int8WeightOnlyLinear, FP8WeightOnlyLinear):
        out = cls.from_float(linear.to(torch.bfloat16))(x)
        assert out.dtype == torch.bfloat16
        assert cosine(out, linear(x).detach()) > 0.99


def test_static_linear_uses_its_calibrated_scale(linear):
    x = torch.randn(8, 64)
    q = Int8StaticLinear.from_float(linear, input_amax=x.abs().max().item())
    assert cosine(q(x), linear(x).detach()) > 0.999
    clipped = Int8StaticLinear.from_float(linear, input_amax=0.1)
    assert cosine(clipped(x), linear(x).detach()) < 0.9


def test_static_linear_with_smoothing_keeps_the_product(linear):
    x = torch.randn(8, 64)
    x[:, 3] *= 50
    smooth = torch.ones(64)
    smooth[3] = 1 / 50
    q = Int8StaticLinear.from_float(linear, input_amax=(x * smooth).abs().max().item(), smooth=smooth)
    assert torch.allclose(q.dequantize(), linear.weight, atol=q.weight_scale.max().item() * 4)
    assert cosine(q(x), linear(x).detach()) > 0.999


def test_hf_conv1d_is_a_transposed_linear():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(48, 64)
    nn.init.normal_(conv.weight)
    assert is_linear(conv) and linear_weight(conv)[0].shape == (48, 64)
    x = torch.randn(3, 64)
    assert cosine(Int8Linear.from_float(conv)(x), conv(x).detach()) > 0.999


@pytest.mark.parametrize("cls", [*ALL, Int8StaticLinear], ids=lambda c: c.format)
def test_state_dict_round_trip_is_bit_exact(cls, linear, tmp_path):
    q = cls.from_float(linear)
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    fresh = cls(64, 48, True)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"), strict=True)
    for k, v in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert not list(q.parameters())
    assert q.format in repr(q)


def test_wrong_input_width_is_a_clear_error(linear):
    with pytest.raises(ValueError, match="expected 64"):
        Int8Linear.from_float(linear)(torch.randn(2, 63))


def test_gradients_pass_straight_through_a_frozen_quantized_linear(linear):
    x = torch.randn(6, 64, requires_grad=True)
    Int8Linear.from_float(linear)(x).sum().backward()
    expected = torch.ones(6, 48) @ linear.weight.detach()
    assert torch.allclose(x.grad, expected, rtol=0.02, atol=0.02)


def test_scaled_mm_options_fuse_the_bias_and_use_fast_accumulation_on_cuda():
    bias = torch.randn(8)
    assert scaled_mm_options(torch.device("cpu"), bias) == {"out_dtype": torch.float32}
    cuda = scaled_mm_options(torch.device("cuda"), bias)
    assert cuda["out_dtype"] == torch.bfloat16 and cuda["use_fast_accum"] is True
    assert cuda["bias"].dtype == torch.bfloat16 and torch.equal(cuda["bias"], bias.to(torch.bfloat16))
    assert scaled_mm_options(torch.device("cuda"), None)["bias"] is None


def test_fp8_keeps_layers_whose_dims_are_not_multiples_of_16_float_on_any_device():
    from dsx.quant.config import FP8Dynamic

    assert "divisible by 16" in FP8Dynamic().rejects(nn.Linear(40, 24))
    assert FP8Dynamic().rejects(nn.Linear(64, 48)) is None
