"""Tests for dsx.kernels.int4_mm: nibble packing, the W4A16 Triton GEMM (interpreted on CPU) and the op against the
dequantizing reference, the packed CPU path, odd shapes, strided activations, bad arguments, compile and export."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsx.kernels import int4_mm as k
from tests.kernels.kernel_testing import DEVICE, rel_err


def operands(n: int, kk: int, group_size: int, device=DEVICE):
    """Random codes (packed), float32 scales in [1e-3, 2e-2] and fractional zeros in [0, 15]."""
    g = torch.Generator().manual_seed(n * 1000 + kk)
    q = torch.randint(0, 16, (n, kk), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, kk // group_size, generator=g) / 50 + 1e-3
    zero = torch.rand(n, kk // group_size, generator=g) * 15
    return k.pack_int4(q).to(device), scale.to(device), zero.to(device), q


def exact(x, q, scale, zero, group_size, bias=None):
    """float64 ``x @ ((q - zero) * scale).T + bias`` from the unpacked codes (independent of ``dequantize_int4``)."""
    w = (q.double().view(q.shape[0], -1, group_size) - zero.double().cpu()[..., None]) * scale.double().cpu()[..., None]
    y = x.double().cpu() @ w.view(q.shape[0], -1).T
    return y if bias is None else y + bias.double().cpu()


def test_pack_is_the_matmulnbits_layout_and_round_trips():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = k.pack_int4(q)
    assert packed.tolist() == [[1 | 2 << 4, 15], [7 | 8 << 4, 9 | 10 << 4]]
    assert torch.equal(k.unpack_int4(packed), q)
    _, scale, zero, q = operands(8, 64, 32, "cpu")
    w = k.dequantize_int4(k.pack_int4(q), scale, zero)
    torch.testing.assert_close(w.double(), exact(torch.eye(64), q, scale, zero, 32).T, rtol=1e-6, atol=1e-7)


@settings(deadline=None, max_examples=12)
@given(m=st.integers(1, 20), n=st.sampled_from([1, 16, 40]), kk=st.sampled_from([64, 128, 256]),
       group_size=st.sampled_from([32, 64, 128]), dtype=st.sampled_from([torch.float32, torch.float16]),
       bias=st.booleans(), sliced=st.booleans())
def test_triton_kernel_matches_exact(m, n, kk, group_size, dtype, bias, sliced):
    if kk % group_size:
        group_size = 32
    qweight, scale, zero, q = operands(n, kk, group_size)
    x = torch.randn(m, kk + 5 if sliced else kk, device=DEVICE).to(dtype)
    x = x[:, 2:kk + 2] if sliced else x
    b = torch.randn(n, device=DEVICE) if bias else None
    y = k.int4_weight_only_mm_triton(x, qweight, scale, zero, group_size, b)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = exact(x, q, scale, zero, group_size, b)
    assert rel_err(y.cpu(), ref) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("m", [1, 7, 16, 40, 300])
def test_cpu_path_packed_and_dequantized(m):
    qweight, scale, zero, q = operands(32, 256, 64, "cpu")
    packed, scales_zeros = k.cpu_pack(qweight, scale, zero)
    assert packed is not None and scales_zeros.dtype == torch.bfloat16
    x, bias = torch.randn(m, 256), torch.randn(32)
    y = k.int4_cpu(x, qweight, scale, zero, 64, bias, packed, scales_zeros)
    ref = exact(x, q, scale, zero, 64, bias)
    # up to PACK_MAX_ROWS rows: bf16 activations and scales; more rows: fp32 dequantization
    assert rel_err(y, ref) < (2e-2 if m <= k.PACK_MAX_ROWS else 1e-5)
    y_op = k.int4_weight_only_mm(x.view(1, m, 256), qweight, scale, zero, 64, bias, packed, scales_zeros)
    assert y_op.shape == (1, m, 32) and torch.equal(y_op.view(m, 32), y)


def test_cpu_pack_declines_where_the_kernel_does_not_apply():
    qweight, scale, zero, _ = operands(24, 64, 32, "cpu")  # N not a multiple of 16
    assert k.cpu_pack(qweight, scale, zero) == (None, None)
    x = torch.randn(3, 64)
    torch.testing.assert_close(k.int4_weight_only_mm(x, qweight, scale, zero, 32).double(),
                               k.int4_reference(x, qweight, scale, zero, 32).double(), rtol=1e-5, atol=1e-5)


def test_fp64_runs_the_dequantizing_path():  # the weight is dequantized in fp32, then widened
    qweight, scale, zero, q = operands(16, 64, 32, "cpu")
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    y = k.int4_weight_only_mm(x, qweight, scale, zero, 32)
    assert y.dtype == torch.float64 and y.shape == (2, 3, 16)
    torch.testing.assert_close(y.view(6, 16), exact(x.view(6, 64), q, scale, zero, 32), rtol=1e-5, atol=1e-6)


def test_gradients_reach_x_and_bias():
    qweight, scale, zero, q = operands(16, 64, 32, "cpu")
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    k.int4_weight_only_mm(x, qweight, scale, zero, 32, bias).pow(2).sum().backward()
    w = exact(torch.eye(64), q, scale, zero, 32).T
    xr, br = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    (xr @ w.T + br).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(bias.grad, br.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 64, dtype=torch.int32)), "x must be a floating"),
    (dict(qweight=torch.zeros(16, 31, dtype=torch.uint8)), "qweight must be uint8"),
    (dict(qweight=torch.zeros(16, 32, dtype=torch.int8)), "qweight must be uint8"),
    (dict(group_size=48), "group_size must divide"),
    (dict(group_size=0), "group_size must divide"),
    (dict(scale=torch.ones(16, 3)), "scale must be float32"),
    (dict(zero=torch.ones(16, 2, dtype=torch.float16)), "zero must be float32"),
    (dict(bias=torch.ones(15)), "bias must be a floating"),
])
def test_bad_arguments_are_clear_errors(bad, match):
    qweight, scale, zero, _ = operands(16, 64, 32, "cpu")
    args = dict(x=torch.randn(2, 64), qweight=qweight, scale=scale, zero=zero, group_size=32, bias=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        k.int4_weight_only_mm(**args)
    with pytest.raises(ValueError, match=match):
        k.int4_weight_only_mm_triton(**args)


def test_compile_and_export_keep_the_op():
    qweight, scale, zero, q = operands(32, 128, 64, "cpu")
    packed, scales_zeros = k.cpu_pack(qweight, scale, zero)

    class M(torch.nn.Module):
        def forward(self, x):
            return k.int4_weight_only_mm(x, qweight, scale, zero, 64, None, packed, scales_zeros)

    x = torch.randn(3, 128)
    eager = M()(x)
    torch.testing.assert_close(torch.compile(M(), fullgraph=True)(x), eager)
    ep = torch.export.export(M(), (x,), dynamic_shapes=({0: torch.export.Dim("rows", max=1024)},))
    assert any(n.target is torch.ops.dsx.int4_weight_only_mm.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(torch.randn(9, 128)).shape, torch.Size([9, 32]))
