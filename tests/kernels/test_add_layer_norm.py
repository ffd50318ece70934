"""Tests for dsx.kernels.add_layer_norm: Triton kernel (interpreted on CPU) and op vs the float64 reference,
gradients, torch.compile and torch.export."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsx.kernels import add_layer_norm as k
from tests.kernels.kernel_testing import DEVICE, KERNEL_TOL, TOL, f64, make, rel_err


@given(
    rows=st.integers(1, 16), cols=st.sampled_from([1, 3, 17, 64, 129, 257]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), layout=st.sampled_from(["contig", "sliced", "transposed"]),
    weight=st.booleans(), bias=st.booleans(),
)
def test_triton_kernel_matches_reference(rows, cols, dtype, layout, weight, bias):
    x, r = make(rows, cols, dtype, layout), make(rows, cols, dtype, "contig")
    w = torch.randn(cols, device=DEVICE).to(dtype) if weight else None
    b = torch.randn(cols, device=DEVICE).to(dtype) if bias else None
    out, s = k.add_layer_norm_triton(x, r, w, b, 1e-5)
    ref, ref_s = k.reference(*f64(x, r, w, b), 1e-5)
    assert out.dtype == s.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < KERNEL_TOL[dtype]
    assert rel_err(s, ref_s) < KERNEL_TOL[dtype]


def test_triton_kernel_leading_dims():
    x, r = torch.randn(2, 3, 5, 33, device=DEVICE), torch.randn(2, 3, 5, 33, device=DEVICE).transpose(1, 2)
    w, b = torch.randn(33, device=DEVICE), torch.randn(33, device=DEVICE)
    out, s = k.add_layer_norm_triton(x, r.transpose(1, 2), w, b, 1e-6)
    ref, ref_s = k.reference(*f64(x, r.transpose(1, 2), w, b), 1e-6)
    assert out.shape == x.shape and rel_err(out, ref) < 1e-5 and rel_err(s, ref_s) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_cpu_matches_reference(dtype):
    x, r, w, b = (torch.randn(*shape).to(dtype) for shape in ((4, 7, 129), (4, 7, 129), (129,), (129,)))
    out, s = torch.ops.dsx.add_layer_norm(x, r, w, b, 1e-5)
    ref, ref_s = k.reference(*f64(x, r, w, b), 1e-5)
    assert out.dtype == s.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype] and rel_err(s, ref_s) < TOL[dtype]
    expected = torch.nn.functional.layer_norm((x + r).double(), (129,), w.double(), b.double(), 1e-5)
    assert rel_err(out, expected) < TOL[dtype]


def test_gradcheck():
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: k.add_layer_norm(*a, eps=1e-5), (x, r, w, b))
    assert torch.autograd.gradcheck(lambda a, c: k.add_layer_norm(a, c, None, None, 1e-5), (x, r))
    assert torch.autograd.gradcheck(lambda a, c: k.add_layer_norm(a, c, None, None, 1e-5)[0], (x, r))


def test_grads_match_eager_layer_norm():
    x, r = torch.randn(5, 24, requires_grad=True), torch.randn(5, 24, requires_grad=True)
    norm = torch.nn.LayerNorm(24)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    out, s = k.add_layer_norm(x, r, norm.weight, norm.bias, norm.eps)
    (out.square().sum() + s.sum()).backward()
    got = [t.grad.clone() for t in (x, r, norm.weight, norm.bias)]
    for t in (x, r, norm.weight, norm.bias):
        t.grad = None
    h = x + r
    (norm(h).square().sum() + h.sum()).backward()
    for g, t in zip(got, (x, r, norm.weight, norm.bias)):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph():
    x, r, w, b = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40), torch.randn(40)

    def f(x, r, w, b):
        out, s = k.add_layer_norm(x, r, w, b)
        return out * s

    torch._dynamo.reset()
    assert torch.allclose(torch.compile(f, fullgraph=True)(x, r, w, b), f(x, r, w, b), rtol=1e-5, atol=1e-6)


def test_export_keeps_op():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, x, r):
            out, s = k.add_layer_norm(x, r, self.norm.weight, self.norm.bias, self.norm.eps)
            return out + s

    block, x, r = Block(), torch.randn(2, 16), torch.randn(2, 16)
    ep = torch.export.export(block, (x, r), strict=False)
    assert torch.ops.dsx.add_layer_norm.default in {n.target for n in ep.graph.nodes}
    assert torch.allclose(ep.module()(x, r), block(x, r))
