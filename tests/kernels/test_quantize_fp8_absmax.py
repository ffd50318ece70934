"""Tests for dsx.kernels.quantize_fp8's optional ``absmax``: a slice of a row scaled by the full row's maximum gets the
full row's codes (what a rowwise tensor-parallel fp8 shard needs) from the op, its CPU path and the Triton kernel;
values beyond a given maximum clamp to +-448; bad ``absmax`` is refused; compile and export keep it."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsx.kernels import quantize_fp8 as k
from tests.kernels.kernel_testing import DEVICE, make
from tests.kernels.test_quantize_fp8 import assert_kernel_matches_reference, bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax(-1, keepdim=True)


def assert_equal(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert got[0].dtype == torch.float8_e4m3fn and got[0].shape == want[0].shape
    assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(got[1].cpu(), want[1].cpu())


@given(
    rows=st.integers(1, 12), cols=st.sampled_from([2, 18, 130]), parts=st.sampled_from([2, 3]),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contig", "sliced", "transposed"]),
)
def test_slice_with_full_row_absmax_gets_full_row_codes(rows, cols, parts, dtype, layout):
    x = make(rows, cols, dtype, layout) * 5
    full_q, full_scale = k.reference(x.cpu())
    amax = row_absmax(x)
    step = -(-cols // parts)
    for i, piece in enumerate(x.chunk(parts, -1)):
        want = (full_q[:, i * step:i * step + piece.shape[-1]], full_scale)
        assert_equal(k.reference(piece.cpu(), amax.cpu()), want)
        assert_equal(k.quantize_fp8_rowwise(piece.cpu(), amax.cpu()), want)
        assert_kernel_matches_reference(piece, *k.quantize_fp8_rowwise_triton(piece, amax), absmax=amax)


def test_values_beyond_the_given_absmax_clamp_and_tiny_absmax_is_floored():
    x = torch.tensor([[1.0, -4.0, 0.5, 2.0], [1e-14, 0.0, -1e-14, 0.0]], device=DEVICE)
    absmax = torch.tensor([[2.0], [0.0]], device=DEVICE)
    q, scale = k.quantize_fp8_rowwise(x.cpu(), absmax.cpu())
    assert_equal((q, scale), k.reference(x.cpu(), absmax.cpu()))
    assert q[0].float().tolist() == [224.0, -448.0, 112.0, 448.0]
    assert scale[1, 0] == torch.tensor(k.AMAX_MIN) / k.FP8_MAX
    assert_kernel_matches_reference(x, *k.quantize_fp8_rowwise_triton(x, absmax), absmax=absmax)


def test_chunked_cpu_path_and_3d_input(monkeypatch):
    monkeypatch.setattr(k, "chunk_rows", lambda cols: 2)
    x = torch.randn(5, 7, 33)
    absmax = row_absmax(x) * 0.5
    assert_equal(k.quantize_fp8_rowwise(x, absmax), k.reference(x, absmax))


def test_bad_absmax_is_refused():
    x = torch.randn(4, 8)
    for bad in (torch.ones(4), torch.ones(4, 1, dtype=torch.int32), torch.ones(3, 1)):
        with pytest.raises(ValueError, match="absmax must be a floating tensor of shape"):
            k.quantize_fp8_rowwise(x, bad)
        with pytest.raises(ValueError, match="absmax must be a floating tensor of shape"):
            k.quantize_fp8_rowwise_triton(x, bad)


def test_torch_compile_and_export_keep_absmax():
    x = torch.randn(4, 6, 32)
    absmax = row_absmax(x) * 2

    def f(x, absmax):
        q, scale = k.quantize_fp8_rowwise(x, absmax)
        return q.float() * scale

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, absmax), f(x, absmax), rtol=0, atol=0)

    class Quant(torch.nn.Module):
        def forward(self, x, absmax):
            return k.quantize_fp8_rowwise(x, absmax)

    ep = torch.export.export(Quant(), (x, absmax), strict=False)
    assert torch.ops.dsx.quantize_fp8_rowwise.default in {n.target for n in ep.graph.nodes}
    assert_equal(ep.module()(x, absmax), k.reference(x, absmax))
