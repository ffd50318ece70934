"""Tests for dsx.kernels.bias_act: Triton kernel (interpreted on CPU) and op vs the float64 reference, activation
names, gradients, torch.compile and torch.export."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dsx.kernels import bias_act as k
from tests.kernels.kernel_testing import DEVICE, KERNEL_TOL, TOL, f64, make, rel_err

ACTS = list(k.ACTS)


@given(
    rows=st.integers(1, 16), cols=st.sampled_from([1, 3, 17, 129, 257, 300]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), layout=st.sampled_from(["contig", "sliced", "transposed"]),
    act=st.sampled_from(ACTS), has_bias=st.booleans(), strided_bias=st.booleans(),
)
def test_triton_kernel_matches_reference(rows, cols, dtype, layout, act, has_bias, strided_bias):
    x = make(rows, cols, dtype, layout)
    bias = torch.randn(2 * cols, device=DEVICE).to(dtype)[::2 if strided_bias else 1][:cols] if has_bias else None
    out = k.bias_act_triton(x, bias, act)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert rel_err(out, k.reference(*f64(x, bias), act)) < KERNEL_TOL[dtype]


def test_triton_kernel_leading_dims_and_empty():
    x, b = torch.randn(2, 3, 5, 33, device=DEVICE), torch.randn(33, device=DEVICE)
    out = k.bias_act_triton(x.transpose(1, 2), b, "gelu_tanh")
    assert out.shape == (2, 5, 3, 33)
    assert rel_err(out, k.reference(x.double().transpose(1, 2), b.double(), "gelu_tanh")) < 1e-5
    assert k.bias_act_triton(torch.empty(0, 8, device=DEVICE), None, "relu").shape == (0, 8)


@pytest.mark.parametrize("act", ACTS)
def test_reference_is_the_torch_activation(act):
    x, b = torch.randn(4, 9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    expected = {"gelu": F.gelu(x + b), "gelu_tanh": F.gelu(x + b, approximate="tanh"),
                "silu": F.silu(x + b), "relu": F.relu(x + b)}[act]
    torch.testing.assert_close(k.reference(x, b, act), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_op_cpu_matches_reference(dtype, act):
    x, b = torch.randn(4, 7, 129).to(dtype), torch.randn(129).to(dtype)
    out = torch.ops.dsx.bias_act(x, b, act)
    assert out.dtype == dtype and rel_err(out, k.reference(x.double(), b.double(), act)) < TOL[dtype]
    assert rel_err(k.bias_act(x, None, act), k.reference(x.double(), None, act)) < TOL[dtype]


def test_invalid_arguments():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="valid activations are.*gelu_tanh"):
        k.bias_act(x, None, "tanh")
    with pytest.raises(ValueError, match="bias shape"):
        k.bias_act(x, torch.randn(3), "relu")
    with pytest.raises(ValueError, match="valid activations"):
        k.bias_act_triton(x, None, "swish")


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(act):
    x, b = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.where((x + b).abs() < 0.1, x + 0.5, x).requires_grad_()  # keep relu away from its kink
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: k.bias_act(a, c, act), (x, b))
    assert torch.autograd.gradcheck(lambda a: k.bias_act(a, None, act), (x,))


def test_grad_matches_autograd_of_reference_bf16():
    x, b = torch.randn(6, 40, dtype=torch.bfloat16, requires_grad=True), torch.randn(40, requires_grad=True)
    k.bias_act(x, b.to(torch.bfloat16), "silu").float().pow(2).sum().backward()
    x2, b2 = x.detach().float().requires_grad_(), b.detach().requires_grad_()
    F.silu(x2 + b2.to(torch.bfloat16).float()).pow(2).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.float32
    assert rel_err(x.grad, x2.grad.double()) < 2e-2 and rel_err(b.grad, b2.grad.double()) < 2e-2


def test_torch_compile_fullgraph():
    x, b = torch.randn(3, 40), torch.randn(40)

    def f(x, b):
        return k.bias_act(x, b, "gelu") * 2 + k.bias_act(x, None, "silu")

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, b), f(x, b), rtol=1e-5, atol=1e-6)


def test_export_keeps_op():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(16))

        def forward(self, x):
            return k.bias_act(x, self.bias, "gelu_tanh")

    block, x = Block(), torch.randn(2, 16)
    ep = torch.export.export(block, (x,), strict=False)
    assert torch.ops.dsx.bias_act.default in {n.target for n in ep.graph.nodes}
    torch.testing.assert_close(ep.module()(x), block(x))
