"""Tests for dsx.kernels.gated_act: Triton kernel (interpreted on CPU) and op vs the float64 reference, Llama's
SwiGLU MLP numerics, gradients, torch.compile and torch.export."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dsx.kernels import gated_act as k
from tests.kernels.kernel_testing import DEVICE, KERNEL_TOL, TOL, make, rel_err

ACTS = ["silu", "gelu", "gelu_tanh", "relu"]


@given(
    rows=st.integers(1, 16), cols=st.sampled_from([1, 3, 17, 129, 257, 300]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), act=st.sampled_from(ACTS),
    gate_layout=st.sampled_from(["contig", "sliced", "transposed"]),
    up_layout=st.sampled_from(["contig", "sliced", "transposed"]),
)
def test_triton_kernel_matches_reference(rows, cols, dtype, act, gate_layout, up_layout):
    gate, up = make(rows, cols, dtype, gate_layout), make(rows, cols, dtype, up_layout)
    out = k.gated_act_triton(gate, up, act)
    assert out.dtype == dtype and out.shape == gate.shape and out.is_contiguous()
    assert rel_err(out, k.reference(gate.double(), up.double(), act)) < KERNEL_TOL[dtype]


def test_triton_kernel_leading_dims_and_empty():
    gate, up = torch.randn(2, 5, 3, 70, device=DEVICE).transpose(1, 2), torch.randn(2, 3, 5, 70, device=DEVICE)
    out = k.gated_act_triton(gate, up, "silu")
    assert out.shape == (2, 3, 5, 70)
    assert rel_err(out, F.silu(gate.double()) * up.double()) < 1e-5
    assert k.gated_act_triton(torch.empty(0, 4), torch.empty(0, 4), "gelu").shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_op_cpu_matches_reference(dtype, act):
    gate, up = torch.randn(4, 7, 129).to(dtype), torch.randn(4, 7, 129).to(dtype)
    out = torch.ops.dsx.gated_act(gate, up, act)
    assert out.dtype == dtype and rel_err(out, k.reference(gate.double(), up.double(), act)) < TOL[dtype]


def test_reference_definitions():
    g, u = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(k.reference(g, u, "silu"), F.silu(g) * u)
    torch.testing.assert_close(k.reference(g, u, "gelu"), F.gelu(g) * u)
    torch.testing.assert_close(k.reference(g, u, "gelu_tanh"), F.gelu(g, approximate="tanh") * u)


def test_matches_llama_mlp_bf16():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=96)).to(torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = mlp(x)
        fused = mlp.down_proj(k.gated_act(mlp.gate_proj(x), mlp.up_proj(x), "silu"))
        exact = mlp.double()(x.double())
    assert fused.dtype == torch.bfloat16
    assert rel_err(fused, exact) < 1e-2 and rel_err(eager, exact) < 1e-2


def test_invalid_arguments():
    with pytest.raises(ValueError, match="valid activations are"):
        k.gated_act(torch.randn(2, 4), torch.randn(2, 4), "tanh")
    with pytest.raises(ValueError, match="must match"):
        k.gated_act(torch.randn(2, 4), torch.randn(4), "silu")
    with pytest.raises(ValueError, match="must match"):
        k.gated_act_triton(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64), "silu")


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_gradcheck(act):
    g = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: k.gated_act(a, b, act), (g, u))


def test_torch_compile_fullgraph():
    g, u = torch.randn(3, 40), torch.randn(3, 40)

    def f(g, u):
        return k.gated_act(g, u, "silu") + k.gated_act(u, g, "gelu_tanh")

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(g, u), f(g, u), rtol=1e-5, atol=1e-6)


def test_export_keeps_op():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)

        def forward(self, x):
            return k.gated_act(self.gate(x), self.up(x), "gelu")

    mlp, x = MLP(), torch.randn(2, 8)
    ep = torch.export.export(mlp, (x,), strict=False)
    assert torch.ops.dsx.gated_act.default in {n.target for n in ep.graph.nodes}
    torch.testing.assert_close(ep.module()(x), mlp(x))
