"""Tests for dsx.kernels.quantize_per_token's optional ``absmax``: kernel, op and reference agree bit for bit, and a
slice of a row quantized with the full row's maximum gets the full row's codes (what a rowwise tensor-parallel shard
needs); values beyond a given maximum clamp; bad ``absmax`` is refused."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsx.kernels import quantize_per_token as k
from tests.kernels.kernel_testing import DEVICE, make

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax(-1, keepdim=True)


def implementations(x: torch.Tensor, absmax: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(q, scale)`` of the Triton kernel, the op (on the CPU) and the direct CPU kernel."""
    return [k.quantize_per_token_triton(x, absmax), k.quantize_per_token(x.cpu(), absmax.cpu()),
            k.quantize_per_token_cpu(x.cpu(), absmax.cpu())]


def assert_equal(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert got[0].dtype == torch.int8 and got[0].shape == want[0].shape
    assert torch.equal(got[0].cpu(), want[0].cpu()) and torch.equal(got[1].cpu(), want[1].cpu())


@given(
    rows=st.integers(1, 20), cols=st.sampled_from([2, 18, 130, 300]), parts=st.sampled_from([2, 3]),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contig", "sliced", "transposed"]),
)
def test_slice_with_full_row_absmax_gets_full_row_codes(rows, cols, parts, dtype, layout):
    x = make(rows, cols, dtype, layout) * 5
    full_q, full_scale = k.reference(x.cpu())
    amax = row_absmax(x)
    for i, piece in enumerate(x.chunk(parts, -1)):
        cols_i = slice(i * -(-cols // parts), i * -(-cols // parts) + piece.shape[-1])
        want = (full_q[:, cols_i], full_scale)
        assert_equal(k.reference(piece.cpu(), amax.cpu()), want)
        for got in implementations(piece, amax):
            assert_equal(got, want)


def test_given_absmax_equal_to_rows_own_is_the_plain_op():
    x = torch.randn(5, 3, 40, device=DEVICE).to(torch.bfloat16)
    for got in implementations(x, row_absmax(x)):
        assert_equal(got, k.reference(x.cpu()))


def test_values_beyond_the_given_absmax_clamp_and_tiny_absmax_is_floored():
    x = torch.tensor([[1.0, -4.0, 0.5, 2.0], [1e-14, 0.0, -1e-14, 0.0]], device=DEVICE)
    absmax = torch.tensor([[2.0], [0.0]], device=DEVICE)
    for got in implementations(x, absmax):
        assert_equal(got, k.reference(x.cpu(), absmax.cpu()))
        assert got[0][0].tolist() == [64, -127, 32, 127]
        assert got[1][1, 0] == torch.tensor(k.AMAX_MIN) / 127


def test_chunked_cpu_path_and_3d_input(monkeypatch):
    monkeypatch.setattr(k, "CHUNK_ELEMS", 64)  # 2 rows of 33 per chunk, with a partial last chunk
    x = torch.randn(5, 7, 33)
    absmax = row_absmax(x) * 0.5
    assert_equal(k.quantize_per_token(x, absmax), k.reference(x, absmax))


def test_bad_absmax_is_refused():
    x = torch.randn(4, 8)
    for bad in (torch.ones(4), torch.ones(4, 1, dtype=torch.int32), torch.ones(3, 1)):
        with pytest.raises(ValueError, match="absmax must be a floating tensor of shape"):
            k.quantize_per_token(x, bad)
        with pytest.raises(ValueError, match="absmax must be a floating tensor of shape"):
            k.quantize_per_token_triton(x, bad)


def test_torch_compile_and_export_keep_absmax():
    x = torch.randn(4, 6, 32)
    absmax = row_absmax(x) * 2

    def f(x, absmax):
        q, scale = k.quantize_per_token(x, absmax)
        return q.float() * scale

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, absmax), f(x, absmax), rtol=0, atol=0)

    class Quant(torch.nn.Module):
        def forward(self, x, absmax):
            return k.quantize_per_token(x, absmax)

    ep = torch.export.export(Quant(), (x, absmax), strict=False)
    assert torch.ops.dsx.quantize_per_token.default in {n.target for n in ep.graph.nodes}
    assert_equal(ep.module()(x, absmax), k.reference(x, absmax))
