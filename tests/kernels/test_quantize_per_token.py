"""Tests for dsx.kernels.quantize_per_token: Triton kernel (interpreted on CPU) and op vs the reference, bit for bit,
including round-half-even ties, all-zero and huge rows, chunked CPU path, torch.compile and torch.export."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsx.kernels import quantize_per_token as k
from tests.kernels.kernel_testing import DEVICE, make

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_matches_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """``(q, scale)`` equal the reference exactly: same fp32 ops in the same order, so no tie can round differently.

    The reference runs on the CPU, where ``amax / 127`` is a true division as in the kernel (CUDA multiplies by 1/127).
    """
    rq, rs = k.reference(x.cpu())
    assert q.dtype == torch.int8 and q.shape == x.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1)
    assert torch.equal(scale.cpu(), rs)
    assert torch.equal(q.cpu(), rq)


@given(
    rows=st.integers(1, 16), cols=st.sampled_from([1, 3, 17, 129, 300]), dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contig", "sliced", "transposed"]),
)
def test_triton_kernel_matches_reference(rows, cols, dtype, layout):
    x = make(rows, cols, dtype, layout) * 5
    assert_matches_reference(x, *k.quantize_per_token_triton(x))


def test_triton_kernel_long_rows_loop_over_blocks():
    x = torch.randn(3, k.MAX_BLOCK + 905, device=DEVICE)
    x[1, -1] = 50.0  # the absmax sits in the last block
    q, scale = k.quantize_per_token_triton(x)
    assert_matches_reference(x, q, scale)
    assert q[1, -1] == 127 and scale[1, 0] == torch.tensor(50.0) / 127


def test_triton_kernel_3d_transposed_and_empty():
    x = torch.randn(2, 3, 5, 33, device=DEVICE).transpose(1, 2)
    assert_matches_reference(x, *k.quantize_per_token_triton(x))
    x1 = torch.randn(40, device=DEVICE).to(torch.bfloat16)
    assert_matches_reference(x1, *k.quantize_per_token_triton(x1))
    q, scale = k.quantize_per_token_triton(torch.empty(0, 8, device=DEVICE))
    assert q.shape == (0, 8) and scale.shape == (0, 1)


def special_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows with exact .5 ties, all zeros, values below the 1e-12 amax floor, and huge magnitudes."""
    big = 6e4 if dtype == torch.float16 else 1e30
    x = torch.randn(6, 8) * 3
    x[0] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 63.5, -126.5])  # 127 / amax == 1: every x.5 is a tie
    x[1] = 0.0
    x[2] = torch.tensor([1e-13, -2e-14, 0, 0, 0, 0, 0, 5e-13]) if dtype != torch.float16 else 0.0
    x[3, 2] = big
    x[4] = -big
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_rows_kernel_and_op(dtype):
    x = special_rows(dtype)
    for q, scale in (k.quantize_per_token_triton(x), k.quantize_per_token(x.cpu())):
        assert_matches_reference(x, q, scale)
        assert q[0].tolist() == [127, 0, 2, 2, 0, -2, 64, -126]  # half to even
        assert q[1].abs().max() == 0 and scale[1, 0] == torch.tensor(k.AMAX_MIN) / 127
        assert q[3, 2] == 127 and q[4].tolist() == [-127] * 8


def test_inverse_scale_is_torch_127_over_amax():
    """``127 / amax`` in torch is ``amax.reciprocal() * 127``, one ulp away from a true division for this amax, which
    moves the product of the second value across the rounding boundary (52 here, 53 with a true division)."""
    x = torch.tensor([[8.778695106506348, 3.628988265991211]], device=DEVICE)
    for q, scale in (k.quantize_per_token_triton(x), k.quantize_per_token(x.cpu())):
        assert_matches_reference(x, q, scale)
        assert q.tolist() == [[127, 52]]


def test_reference_round_trip():
    x = torch.randn(5, 64, dtype=torch.float64).float() * torch.logspace(-3, 3, 5)[:, None]
    q, scale = k.reference(x)
    assert (q.abs().amax(-1) == 127).all()  # the absmax of every row maps to +-127
    assert ((q.float() * scale - x).abs() <= scale * (0.5 + 1e-5)).all()


@given(
    rows=st.integers(1, 16), cols=st.sampled_from([1, 17, 300]), dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contig", "sliced", "transposed"]),
)
def test_op_cpu_matches_reference(rows, cols, dtype, layout):
    x = (torch.randn(cols, rows).t() if layout == "transposed" else torch.randn(rows, cols + 2)[:, 1:cols + 1]
         if layout == "sliced" else torch.randn(rows, cols)).to(dtype) * 7
    assert_matches_reference(x, *k.quantize_per_token(x))


def test_op_cpu_chunks(monkeypatch):
    monkeypatch.setattr(k, "CHUNK_ELEMS", 64)  # 2 rows of 33 per chunk, 3-D input with a partial last chunk
    x = torch.randn(5, 3, 33).to(torch.bfloat16)
    assert_matches_reference(x, *k.quantize_per_token(x))
    q, scale = k.quantize_per_token(torch.empty(0, 3, 4))
    assert q.shape == (0, 3, 4) and scale.shape == (0, 3, 1)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        k.quantize_per_token(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-empty last dim"):
        k.quantize_per_token(torch.randn(3, 0))
    with pytest.raises(ValueError, match="at least one dimension"):
        k.quantize_per_token_triton(torch.tensor(1.0))


def test_torch_compile_fullgraph():
    x = torch.randn(4, 7, 48)

    def f(x):
        q, scale = k.quantize_per_token(x * 2)
        return q.float() * scale

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


def test_export_keeps_op():
    class Quant(torch.nn.Module):
        def forward(self, x):
            return k.quantize_per_token(x)

    x = torch.randn(3, 5, 16)
    ep = torch.export.export(Quant(), (x,), strict=False)
    assert torch.ops.dsx.quantize_per_token.default in {n.target for n in ep.graph.nodes}
    q, scale = ep.module()(x)
    assert_matches_reference(x, q, scale)
