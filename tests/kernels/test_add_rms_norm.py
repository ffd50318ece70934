"""Tests for dsx.kernels.add_rms_norm: Triton kernel (interpreted on CPU) and ops vs the float64 reference,
Hugging Face Llama numerics, gradients, torch.compile and torch.export."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsx.kernels import add_rms_norm as k
from tests.kernels.kernel_testing import DEVICE, KERNEL_TOL, TOL, f64, make, rel_err


@given(
    rows=st.integers(1, 16), cols=st.sampled_from([1, 3, 17, 64, 129, 257]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), layout=st.sampled_from(["contig", "sliced", "transposed"]),
    residual=st.booleans(), weight=st.booleans(),
)
def test_triton_kernel_matches_reference(rows, cols, dtype, layout, residual, weight):
    x = make(rows, cols, dtype, layout)
    r = make(rows, cols, dtype, layout) if residual else None
    w = torch.randn(cols, device=DEVICE).to(dtype) if weight else None
    out, s = k.add_rms_norm_triton(x, r, w, 1e-6)
    ref, ref_s = k.reference(*f64(x, r, w), 1e-6)
    assert out.dtype == s.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < KERNEL_TOL[dtype]
    assert rel_err(s, ref_s) < KERNEL_TOL[dtype]


def test_triton_kernel_leading_dims():
    x, r = torch.randn(2, 3, 5, 33, device=DEVICE), torch.randn(2, 3, 5, 33, device=DEVICE)
    w = torch.randn(33, device=DEVICE)
    out, s = k.add_rms_norm_triton(x, r, w, 1e-5)
    ref, ref_s = k.reference(x.double(), r.double(), w.double(), 1e-5)
    assert out.shape == x.shape and rel_err(out, ref) < 1e-5 and rel_err(s, ref_s) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_cpu_match_reference(dtype):
    x, r, w = (torch.randn(*shape).to(dtype) for shape in ((4, 7, 129), (4, 7, 129), (129,)))
    out, s = torch.ops.dsx.add_rms_norm(x, r, w, 1e-6)
    ref, ref_s = k.reference(x.double(), r.double(), w.double(), 1e-6)
    assert rel_err(out, ref) < TOL[dtype] and rel_err(s, ref_s) < TOL[dtype]
    assert rel_err(torch.ops.dsx.rms_norm(x, w, 1e-6), k.reference(x.double(), None, w.double(), 1e-6)[0]) < TOL[dtype]
    assert rel_err(torch.ops.dsx.rms_norm(x, None, 1e-6), k.reference(x.double(), None, None, 1e-6)[0]) < TOL[dtype]


def test_matches_hugging_face_llama_rmsnorm_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(6, 96, dtype=torch.bfloat16), torch.randn(6, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = norm(x + r)
        assert torch.equal(k.add_rms_norm(x, r, norm.weight)[0], expected)
        assert torch.equal(k.rms_norm(x + r, norm.weight), expected)
        out = k.add_rms_norm_triton(x.to(DEVICE), r.to(DEVICE), norm.weight.to(DEVICE), 1e-6)[0].cpu()
    assert rel_err(out, expected.double()) < KERNEL_TOL[torch.bfloat16]


def test_gradcheck():
    x, r = (torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: k.add_rms_norm(a, b, c, 1e-5), (x, r, w))
    assert torch.autograd.gradcheck(lambda a, b: k.add_rms_norm(a, b, None, 1e-5), (x, r))
    assert torch.autograd.gradcheck(lambda a, c: k.rms_norm(a, c, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda a: k.rms_norm(a, None, 1e-5), (x,))


def test_grad_through_residual_output_only():
    x, r = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    k.add_rms_norm(x, r, torch.ones(8))[1].sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 8)) and torch.equal(r.grad, torch.ones(4, 8))


def test_torch_compile_fullgraph():
    x, r, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)

    def f(x, r, w):
        out, s = k.add_rms_norm(x, r, w)
        return k.rms_norm(out + s, w)

    torch._dynamo.reset()
    assert torch.allclose(torch.compile(f, fullgraph=True)(x, r, w), f(x, r, w), rtol=1e-5, atol=1e-6)


def test_export_keeps_ops():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(16))

        def forward(self, x, r):
            out, s = k.add_rms_norm(x, r, self.weight)
            return k.rms_norm(out, self.weight) + s

    block, x, r = Block(), torch.randn(2, 16), torch.randn(2, 16)
    ep = torch.export.export(block, (x, r), strict=False)
    targets = {n.target for n in ep.graph.nodes}
    assert torch.ops.dsx.add_rms_norm.default in targets and torch.ops.dsx.rms_norm.default in targets
    assert torch.allclose(ep.module()(x, r), block(x, r))
