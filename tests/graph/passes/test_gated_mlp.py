"""Tests for the gated_mlp graph pass: SwiGLU / GeGLU products in exported graphs (tiny modules and a tiny Llama)
become dsx.gated_act nodes with eager numerics; activations read elsewhere are left alone."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.graph.passes.gated_mlp import gated_mlp
from tests.hf_models import tiny_hf
from tests.graph.pass_testing import export, rel_err, targets

aten = torch.ops.aten
GATED = torch.ops.dsx.gated_act.default








class GatedMLP(nn.Module):
    def __init__(self, act, swap: bool = False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 24, bias=False), nn.Linear(8, 24, bias=False), nn.Linear(24, 8)
        self.act, self.swap = act, swap

    def forward(self, x):
        g, u = self.act(self.gate(x)), self.up(x)
        return self.down(u * g if self.swap else g * u)


@pytest.mark.parametrize("act, name, old", [
    (F.silu, "silu", aten.silu.default),
    (F.gelu, "gelu", aten.gelu.default),
    (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh", aten.gelu.default),
])
@pytest.mark.parametrize("swap", [False, True])
def test_fuses_gated_product(act, name, old, swap):
    model, x = GatedMLP(act, swap).eval(), torch.randn(2, 5, 8)
    gm = export(model, x)
    assert gated_mlp(gm) == 1
    gm.recompile()
    (fused,) = [n for n in gm.graph.nodes if n.target == GATED]
    assert fused.args[2] == name and fused.meta["val"].shape == (2, 5, 24)
    assert old not in targets(gm) and aten.mul.Tensor not in targets(gm)
    assert rel_err(gm(x), model(x)) < 1e-5


def test_any_tensors_of_one_shape():
    class Plain(nn.Module):
        def forward(self, a, b):
            return F.silu(a) * b + 1

    a, b = torch.randn(3, 7), torch.randn(3, 7)
    gm = export(Plain(), a, b)
    assert gated_mlp(gm) == 1
    gm.recompile()
    assert rel_err(gm(a, b), Plain()(a, b)) < 1e-5


def test_tiny_llama_mlps_fused():
    model, kwargs = tiny_hf("llama")
    gm = export(model, **kwargs, use_cache=False)
    assert gated_mlp(gm) == 2
    gm.graph.lint()
    gm.recompile()
    assert targets(gm).count(GATED) == 2 and aten.silu.default not in targets(gm)
    with torch.no_grad():
        out = gm(**kwargs, use_cache=False)
        assert rel_err(out.last_hidden_state, model(**kwargs).last_hidden_state) < 1e-5


class ActReadTwice(nn.Module):
    def forward(self, a, b):
        g = F.silu(a)
        return g * b, g


class Broadcast(nn.Module):
    def forward(self, a, b):
        return F.silu(a) * b


class OtherActivation(nn.Module):
    def forward(self, a, b):
        return torch.relu(a) * b + torch.sigmoid(a) * b


@pytest.mark.parametrize("model, shapes", [
    (ActReadTwice(), [(3, 6), (3, 6)]),
    (Broadcast(), [(3, 6), (6,)]),
    (Broadcast(), [(1, 6), (3, 6)]),
    (OtherActivation(), [(3, 6), (3, 6)]),
])
def test_no_match(model, shapes):
    args = [torch.randn(s) for s in shapes]
    gm = export(model, *args)
    before = targets(gm)
    assert gated_mlp(gm) == 0
    assert targets(gm) == before


def test_mixed_dtypes_not_fused():
    a, b = torch.randn(3, 6, dtype=torch.bfloat16), torch.randn(3, 6)
    gm = export(Broadcast(), a, b)
    assert gated_mlp(gm) == 0
