"""Tests for the bias_act graph pass: linear bias / ``y + b`` / GPT-2 addmm followed by GELU, SiLU, ReLU or GPT-2's
hand-written tanh GELU become dsx.bias_act nodes with eager numerics; non-matching graphs are left alone."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.graph.passes.bias_act import bias_act
from tests.hf_models import tiny_hf
from tests.graph.pass_testing import export, fused_nodes, rel_err, targets

aten = torch.ops.aten
BIAS_ACT = torch.ops.dsx.bias_act.default
ACTS = {
    "gelu": (F.gelu, aten.gelu.default),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), aten.gelu.default),
    "silu": (F.silu, aten.silu.default),
    "relu": (F.relu, aten.relu.default),
}










def run(model: nn.Module, *args, expected: int) -> torch.fx.GraphModule:
    gm = export(model, *args)
    assert bias_act(gm) == expected
    gm.graph.lint()
    gm.recompile()
    assert rel_err(gm(*args), model(*args)) < 1e-5
    return gm


def gelu_new(t: torch.Tensor) -> torch.Tensor:
    """Hugging Face's NewGELUActivation ("gelu_new"), as GPT-2 writes it."""
    return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * torch.pow(t, 3.0))))


class LinearAct(nn.Module):
    def __init__(self, act, bias: bool = True):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 12, bias=bias), act

    def forward(self, x):
        return self.act(self.fc(x)) * 2


@pytest.mark.parametrize("name", list(ACTS))
def test_linear_bias_activation(name):
    act, old = ACTS[name]
    gm = run(LinearAct(act).eval(), torch.randn(2, 3, 8), expected=1)
    (fused,) = fused_nodes(gm, BIAS_ACT)
    linear = fused.args[0]
    assert fused.args[2] == name and fused.meta["val"].shape == (2, 3, 12)
    assert linear.target == aten.linear.default and len(linear.args) == 2 and not linear.kwargs
    assert old not in targets(gm)


class AddBiasAct(nn.Module):
    def __init__(self, act, bias_first: bool):
        super().__init__()
        self.bias, self.act, self.bias_first = nn.Parameter(torch.randn(6)), act, bias_first

    def forward(self, y):
        return self.act(self.bias + y if self.bias_first else y + self.bias)


@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_add_bias_activation(name, bias_first):
    gm = run(AddBiasAct(ACTS[name][0], bias_first), torch.randn(4, 5, 6), expected=1)
    assert aten.add.Tensor not in targets(gm) and ACTS[name][1] not in targets(gm)


class AddmmGeluNew(nn.Module):
    """GPT-2 Conv1D (``addmm(b, x.view(-1, nx), w).view(...)``) followed by gelu_new."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(8, 16) * 0.3), nn.Parameter(torch.randn(16))

    def forward(self, x):
        y = torch.addmm(self.bias, x.view(-1, 8), self.weight).view(*x.shape[:-1], 16)
        return gelu_new(y)


def test_addmm_view_gelu_new():
    gm = run(AddmmGeluNew(), torch.randn(2, 3, 8), expected=1)
    assert fused_nodes(gm, BIAS_ACT)[0].args[2] == "gelu_tanh"
    for gone in (aten.addmm.default, aten.tanh.default, aten.pow.Tensor_Scalar, aten.mul.Tensor):
        assert gone not in targets(gm)
    assert aten.mm.default in targets(gm)


def test_addmm_relu_without_view():
    class Addmm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(16))

        def forward(self, x):
            return torch.relu(torch.addmm(self.bias, x, self.weight))

    run(Addmm(), torch.randn(5, 8), expected=1)


def test_tiny_gpt2_mlps_fused():
    model, kwargs = tiny_hf("gpt2")
    gm = export(model, **kwargs, use_cache=False)
    assert bias_act(gm) == 2
    gm.graph.lint()
    gm.recompile()
    assert all(n.args[2] == "gelu_tanh" for n in fused_nodes(gm, BIAS_ACT)) and aten.tanh.default not in targets(gm)
    with torch.no_grad():
        out = gm(**kwargs, use_cache=False).last_hidden_state
        assert rel_err(out, model(**kwargs).last_hidden_state) < 1e-5


def test_tiny_bert_intermediate_fused():
    model, kwargs = tiny_hf("bert")
    gm = export(model, **kwargs)
    assert bias_act(gm) == 2
    gm.recompile()
    assert aten.gelu.default not in targets(gm)
    with torch.no_grad():
        assert rel_err(gm(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state) < 1e-5


class LinearReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return F.gelu(y) + y


class NonLastDimBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(6, 1))

    def forward(self, y):
        return F.silu(y + self.bias)


class GeluNewReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        inner = y + 0.044715 * torch.pow(y, 3.0)
        return 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * inner)) + inner


class NotGeluNew(nn.Module):
    def __init__(self, scale: float, power: float):
        super().__init__()
        self.fc, self.scale, self.power = nn.Linear(8, 8), scale, power

    def forward(self, x):
        y = self.fc(x)
        return 0.5 * y * (1.0 + torch.tanh(self.scale * (y + 0.044715 * torch.pow(y, self.power))))


class TensorBiasAdd(nn.Module):
    def forward(self, y, z):
        return F.relu(y + z)


@pytest.mark.parametrize("model, shapes", [
    (LinearAct(F.gelu, bias=False), [(2, 8)]),
    (LinearAct(torch.tanh), [(2, 8)]),
    (LinearReadTwice(), [(2, 8)]),
    (NonLastDimBias(), [(3, 6, 6)]),
    (GeluNewReadTwice(), [(2, 8)]),
    (NotGeluNew(0.8, 3.0), [(2, 8)]),
    (NotGeluNew(math.sqrt(2.0 / math.pi), 2.0), [(2, 8)]),
    (TensorBiasAdd(), [(4, 6), (4, 6)]),
    (TensorBiasAdd(), [(1, 6), (4, 6)]),
])
def test_no_match(model, shapes):
    args = [torch.randn(s) for s in shapes]
    gm = export(model, *args)
    before = targets(gm)
    assert bias_act(gm) == 0
    assert targets(gm) == before


def test_promoting_bias_not_fused():
    y, b = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(6)
    gm = export(TensorBiasAdd(), y, b)
    assert bias_act(gm) == 0
