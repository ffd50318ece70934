"""Tests for dsx.kernels.quantize_fp8: Triton kernel (interpreted on CPU) and op vs the reference, all-zero and huge
rows, fp8 saturation, chunked CPU path, torch.compile and torch.export."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsx.kernels import quantize_fp8 as k
from dsx.kernels import quantize_per_token
from tests.kernels.kernel_testing import DEVICE, make

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP8_MIN_NORMAL = 2.0 ** -6
FP8_SUBNORMAL_STEP = 2.0 ** -9


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.cpu().view(torch.uint8)


def check_shapes(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1)


def assert_kernel_matches_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                                    absmax: torch.Tensor | None = None) -> None:
    """The scale matches the reference exactly, and so does ``q`` on a GPU.

    The Triton interpreter stores fp8 through its own float conversion, which differs from round-to-nearest-even in
    three ways: ties round away from zero, a round-up into the next power of two loses the carry when the exponent
    field is odd (the result is half the correct value), and values in the fp8 subnormal range are truncated. Only
    those elements may differ, and only in that way.
    """
    check_shapes(x, q, scale)
    rq, rs = k.reference(x.cpu(), None if absmax is None else absmax.cpu())
    assert torch.equal(scale.cpu(), rs)
    if DEVICE.type == "cuda":
        assert torch.equal(bits(q), bits(rq))
        return
    got, want = q.cpu().float(), rq.float()
    v = (x.cpu().float() / rs).clamp(-k.FP8_MAX, k.FP8_MAX)
    tie_away = ((v - want).abs() == (v - got).abs()) & (got.abs() > want.abs())
    lost_carry = (got == want / 2) & (want.abs().log2().frac() == 0) & (v.abs() < want.abs())
    truncated_subnormal = (v.abs() < FP8_MIN_NORMAL) & ((got - want).abs() <= FP8_SUBNORMAL_STEP)
    slips = bits(q) != bits(rq)
    assert not (slips & ~tie_away & ~lost_carry & ~truncated_subnormal).any()
    assert slips.sum() <= max(2, slips.numel() // 10)


def assert_op_matches_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    check_shapes(x, q, scale)
    rq, rs = k.reference(x.cpu())
    assert torch.equal(scale.cpu(), rs) and torch.equal(bits(q), bits(rq))


@given(
    rows=st.integers(1, 16), cols=st.sampled_from([1, 3, 17, 129, 300]), dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contig", "sliced", "transposed"]),
)
def test_triton_kernel_matches_reference(rows, cols, dtype, layout):
    x = make(rows, cols, dtype, layout) * 3
    assert_kernel_matches_reference(x, *k.quantize_fp8_rowwise_triton(x))


def test_triton_kernel_long_rows_3d_and_empty():
    x = torch.randn(2, quantize_per_token.MAX_BLOCK + 300, device=DEVICE)
    x[0, -1] = -30.0  # the absmax sits in the last block
    q, scale = k.quantize_fp8_rowwise_triton(x)
    assert_kernel_matches_reference(x, q, scale)
    assert q[0, -1].float() == -448 and scale[0, 0] == torch.tensor(30.0) / 448
    x3 = torch.randn(2, 3, 5, 33, device=DEVICE).to(torch.bfloat16).transpose(1, 2)
    assert_kernel_matches_reference(x3, *k.quantize_fp8_rowwise_triton(x3))
    q, scale = k.quantize_fp8_rowwise_triton(torch.empty(0, 8, device=DEVICE))
    assert q.shape == (0, 8) and scale.shape == (0, 1)


def special_rows(dtype: torch.dtype) -> torch.Tensor:
    """All zeros, values below the 1e-12 amax floor, huge magnitudes, exact fp8 values and a row of one value."""
    big = 6e4 if dtype == torch.float16 else 1e30
    x = torch.randn(5, 8) * 3
    x[0] = 0.0
    x[1] = torch.tensor([1e-13, -2e-14, 0, 0, 0, 0, 0, 5e-13]) if dtype != torch.float16 else 0.0
    x[2, 2] = big
    x[3] = torch.tensor([448.0, -448.0, 224.0, 1.0, -0.5, 0.0, 416.0, 2.0 ** -9])  # scale 1: exact fp8 values
    x[4] = -big
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_rows_kernel_and_op(dtype):
    x = special_rows(dtype)
    assert_kernel_matches_reference(x, *k.quantize_fp8_rowwise_triton(x))
    q, scale = k.quantize_fp8_rowwise(x.cpu())
    assert_op_matches_reference(x, q, scale)
    assert (q[0].float() == 0).all() and scale[0, 0] == torch.tensor(k.AMAX_MIN) / 448
    assert q[2, 2].float() == 448 and (q[4].float() == -448).all()
    assert scale[3, 0] == 1 and q[3].float().tolist() == x[3].float().tolist()


def test_values_are_divided_by_the_scale():
    """``x / scale`` and ``x * (1 / scale)`` differ by an ulp for this row, enough to land on either side of the
    midpoint between the fp8 values 176 and 192."""
    x = torch.tensor([[9.392187118530273, 3.8575050830841064]], device=DEVICE)
    q, scale = k.quantize_fp8_rowwise_triton(x)
    assert_kernel_matches_reference(x, q, scale)
    assert q.float().tolist() == [[448, 176]]
    assert_op_matches_reference(x, *k.quantize_fp8_rowwise(x.cpu()))


def test_reference_round_trip():
    x = torch.randn(5, 64) * torch.logspace(-3, 3, 5)[:, None]
    q, scale = k.reference(x)
    assert (q.float().abs().amax(-1) == 448).all()  # the absmax of every row maps to +-448
    assert ((q.float() * scale - x).abs() <= x.abs() / 16 + scale * FP8_SUBNORMAL_STEP).all()  # 3 mantissa bits


@given(
    rows=st.integers(1, 16), cols=st.sampled_from([1, 17, 300]), dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contig", "sliced", "transposed"]),
)
def test_op_cpu_matches_reference(rows, cols, dtype, layout):
    x = (torch.randn(cols, rows).t() if layout == "transposed" else torch.randn(rows, cols + 2)[:, 1:cols + 1]
         if layout == "sliced" else torch.randn(rows, cols)).to(dtype) * 7
    assert_op_matches_reference(x, *k.quantize_fp8_rowwise(x))


def test_op_cpu_chunks(monkeypatch):
    monkeypatch.setattr(quantize_per_token, "CHUNK_ELEMS", 64)  # 2 rows of 33 per chunk, partial last chunk
    x = torch.randn(5, 3, 33).to(torch.bfloat16)
    assert_op_matches_reference(x, *k.quantize_fp8_rowwise(x))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        k.quantize_fp8_rowwise(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-empty last dim"):
        k.quantize_fp8_rowwise_triton(torch.randn(3, 0))


def test_torch_compile_fullgraph():
    x = torch.randn(4, 7, 48)

    def f(x):
        q, scale = k.quantize_fp8_rowwise(x * 2)
        return q.float() * scale

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


def test_export_keeps_op():
    class Quant(torch.nn.Module):
        def forward(self, x):
            return k.quantize_fp8_rowwise(x)

    x = torch.randn(3, 5, 16)
    ep = torch.export.export(Quant(), (x,), strict=False)
    assert torch.ops.dsx.quantize_fp8_rowwise.default in {n.target for n in ep.graph.nodes}
    assert_op_matches_reference(x, *ep.module()(x))
