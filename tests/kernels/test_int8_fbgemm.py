"""Tests for dsx.kernels.int8_fbgemm: the fbgemm W8A8 matmul computes the same exact integer product as
``int8_scaled_mm``'s reference (sub-maximal rows, extreme codes that would overflow int16 pairs, zero rows, bias and
output dtypes), and the path choice by CPU."""

import pytest
import torch

from dsx.kernels import int8_fbgemm as fb
from dsx.kernels.int8_mm import scaled_mm_reference
from dsx.kernels.quantize_per_token import quantize_per_token

pytestmark = pytest.mark.skipif(not fb.fbgemm_available(), reason="this torch build has no fbgemm")


def operands(m: int, n: int, k: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(m * 1000 + n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return a, torch.rand(m, 1, generator=g) / 50 + 1e-3, w, torch.rand(n, generator=g) / 50 + 1e-3


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (3, 17, 64), (33, 64, 200)])
@pytest.mark.parametrize("bias", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_matches_the_exact_integer_reference(m, n, k, bias, out_dtype):
    a, a_scale, w, w_scale = operands(m, n, k)
    b = None if bias is None else torch.randn(n).to(bias)
    out = fb.int8_scaled_mm_fbgemm(a, a_scale, fb.prepack(w, w_scale), b, out_dtype)
    ref = scaled_mm_reference(a, a_scale, w.t(), w_scale, b, out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol)


def test_rows_that_never_reach_127_and_zero_rows_stay_exact():
    a, a_scale, w, w_scale = operands(4, 24, 48)
    a = (a // 5).to(torch.int8)  # codes within [-26, 25]: fbgemm's input scale must still be exactly 1
    a[2] = 0
    out = fb.int8_scaled_mm_fbgemm(a, a_scale, fb.prepack(w, w_scale))
    assert torch.allclose(out, scaled_mm_reference(a, a_scale, w.t(), w_scale, None, torch.float32), rtol=1e-5,
                          atol=1e-6)
    assert (out[2] == 0).all()


def test_extreme_codes_do_not_saturate():
    k = 256
    a = torch.full((1, k), 127, dtype=torch.int8)
    a[0, 0] = -127
    w = torch.full((8, k), 127, dtype=torch.int8)
    out = fb.int8_scaled_mm_fbgemm(a, torch.ones(1, 1), fb.prepack(w, torch.ones(8)))
    assert (out == 127 * 127 * (k - 2)).all()


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_rows_get_quantize_per_token_codes(rows, dtype):
    torch.manual_seed(rows)
    x, wf = (torch.randn(rows, 64) * torch.logspace(-3, 3, rows)[:, None]).to(dtype), torch.randn(32, 64)
    w_scale = wf.abs().amax(1) / 127
    w = torch.round(wf / w_scale[:, None]).to(torch.int8)
    bias = torch.randn(32)
    xq, xs = quantize_per_token(x)
    out = fb.int8_dynamic_mm_fbgemm(x, fb.prepack(w, w_scale), bias)
    ref = scaled_mm_reference(xq, xs, w.t(), w_scale, bias, dtype)
    assert out.dtype == dtype and torch.allclose(out.float(), ref.float(), rtol=1e-5, atol=1e-5)
    exact = x.float() @ (w.float() * w_scale[:, None]).t() + bias
    assert ((out - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.02  # per-row scales: small rows stay accurate


def test_path_choice_follows_the_cpu(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setattr(fb, "has_int8_dot", lambda: False)
    assert fb.use_fbgemm(x, 1) and fb.use_fbgemm(x, 4096)
    monkeypatch.setattr(fb, "has_int8_dot", lambda: True)
    assert fb.use_fbgemm(x, fb.MAX_ROWS_WITH_INT8_DOT) and not fb.use_fbgemm(x, fb.MAX_ROWS_WITH_INT8_DOT + 1)


def w7_mm(x: torch.Tensor, packed, bias=None, absmax=None, out_dtype=None) -> torch.Tensor:
    return fb.int8_w7_mm_fbgemm(x, packed, bias, out_dtype, absmax)


def w7_operands(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 7 + k)
    return torch.randint(-63, 64, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g) / 50 + 1e-3


@pytest.mark.parametrize("rows", [2, 6, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_w7_one_pass_gets_the_exact_product_of_quantize_per_token_codes(rows, dtype, bias):
    torch.manual_seed(rows)
    x = (torch.randn(rows, 96) * torch.logspace(-3, 3, rows)[:, None]).to(dtype)
    w, w_scale = w7_operands(40, 96)
    b = torch.randn(40) if bias else None
    xq, xs = quantize_per_token(x)
    packed = fb.prepack(w, w_scale)
    out = w7_mm(x, packed, b)
    ref = scaled_mm_reference(xq, xs, w.t(), w_scale, b, torch.float32)
    assert out.dtype == dtype and out.shape == (rows, 40)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    again = w7_mm(x, packed, b)  # the reused input buffer leaves no trace
    assert torch.equal(again, out)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_w7_single_row_is_within_half_a_step_of_its_own_8_bit_range(scale, dtype, bias):
    """Decode's single row goes in as it is: fbgemm rounds it to 8 bits over ``[min(x, 0), max(x, 0)]``, lifted,
    so that even a row of magnitude 1e-6 keeps that relative precision."""
    torch.manual_seed(3)
    x = (torch.randn(1, 96) * scale).to(dtype)
    w, w_scale = w7_operands(40, 96)
    b = torch.randn(40) if bias else None
    out = w7_mm(x, fb.prepack(w, w_scale), b)
    wf = w.float() * w_scale[:, None]
    exact = x.float() @ wf.t() + (0 if b is None else b)
    step = (x.float().clamp_min(0).max() - x.float().clamp_max(0).min()) / 255
    bound = wf.abs().sum(1) * step / 2  # every element off by at most half a step
    assert out.dtype == dtype and out.shape == (1, 40)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((out.float() - exact).abs() <= bound * 1.001 + tol * exact.abs()).all()
    if dtype == torch.float32:  # a step no coarser than the symmetric per-token code's
        assert ((out - exact).abs() <= wf.abs().sum(1) * x.abs().max() / 127 / 2 + tol * exact.abs()).all()


def test_w7_rounds_as_quantize_per_token():
    """Codes round half to even, and values just below a half round down: fbgemm's own rounding adds its zero point
    (128) first, in fp32, where ``129.4999990`` becomes ``129.5`` and then 130, one code too many."""
    below = 0.5 - 2.0**-20
    x = torch.tensor([[127.0, 2.5, 3.5, -0.5, 1.0 + below, -(1.0 + below), 2.0 + below, 0.0]]).repeat(2, 1)
    w = torch.eye(8, dtype=torch.int8) * 63
    out = w7_mm(x, fb.prepack(w, torch.full((8,), 1 / 63)))
    want = torch.tensor([[127.0, 2.0, 4.0, 0.0, 1.0, -1.0, 2.0, 0.0]]).repeat(2, 1)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("sign", [1, -1])
def test_w7_extreme_codes_do_not_saturate(rows, sign):
    k = 256
    x = torch.full((rows, k), 127.0 * sign)
    w = torch.full((8, k), 63, dtype=torch.int8)
    out = w7_mm(x, fb.prepack(w, torch.ones(8)))
    assert (out == sign * 127 * 63 * k).all()


def test_w7_given_absmax_clamps_codes_and_sets_the_out_dtype():
    x = torch.tensor([[4.0, -2.0, 1.0, 0.5]])
    w = torch.eye(4, dtype=torch.int8) * 63
    out = w7_mm(x.bfloat16(), fb.prepack(w, torch.full((4,), 1 / 63)), absmax=torch.tensor([[2.0]]),
                               out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[2.0, -2.0, 1.0, 0.5]]), atol=2 / 127)
