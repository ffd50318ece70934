"""Tests for layer rules: a custom layer is pinned (and named) until ``dsx.compress.register_layer`` teaches dsx how
to prune it, then it shrinks with its neighbours; bad input to ``register_layer`` is refused."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsx
from dsx.compress import LayerRule, register_layer
from dsx.compress.layer_rules import LinearRule, rule_for


class ScaledLinear(nn.Module):
    """A linear layer with a learned per-output scale, unknown to dsx."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out))
        self.scale = nn.Parameter(torch.rand(n_out) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale[:, None], self.bias)


class ScaledLinearRule(LayerRule):
    def in_channels(self, layer: nn.Module) -> dict[str, int]:
        return {"weight": 1}

    def out_channels(self, layer: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0, "scale": 0}

    def resize(self, layer: nn.Module) -> None:
        layer.out_features, layer.in_features = layer.weight.shape


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.scaled, self.fc2 = nn.Linear(16, 32), ScaledLinear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.scaled(torch.relu(self.fc1(x)))))


@pytest.fixture
def registered():
    previous = register_layer(ScaledLinear, ScaledLinearRule())
    yield
    register_layer(ScaledLinear, previous)


def test_an_unknown_layer_is_pinned_and_named():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"scaled \(ScaledLinear\).*dsx.compress.register_layer"):
        small = dsx.prune(model, 0.3, structured=True, example_inputs=x)
    assert "scaled" in dsx.history(small)[-1]["info"]["skipped"]["fc1"]
    assert small.fc1.out_features == 32 and small.scaled.weight.shape == (32, 32)


def test_a_registered_layer_is_pruned_with_its_neighbours(registered):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(8, 16)
    small = dsx.prune(model, 0.3, structured=True, example_inputs=x)
    info = dsx.history(small)[-1]["info"]
    assert set(info["original"]) == {"fc1", "scaled"} and "fc1" not in info["skipped"]
    hidden, out = small.fc1.out_features, small.scaled.out_features
    assert hidden < 32 and out < 32
    assert small.scaled.weight.shape == (out, hidden) and small.scaled.in_features == hidden
    assert small.scaled.bias.shape == small.scaled.scale.shape == (out,)
    assert small.fc2.in_features == out
    assert small(x).shape == model(x).shape == (8, 4)


def test_register_layer_returns_the_previous_rule_and_none_removes_it():
    rule = ScaledLinearRule()
    assert register_layer(ScaledLinear, rule) is None
    assert rule_for(ScaledLinear(2, 2)) is rule
    assert register_layer(ScaledLinear, None) is rule
    assert rule_for(ScaledLinear(2, 2)) is None


def test_builtin_layers_go_through_the_same_registry():
    class MyLinear(nn.Linear):
        pass

    assert isinstance(rule_for(MyLinear(2, 2)), LinearRule)
    rule = ScaledLinearRule()
    previous = register_layer(nn.Linear, rule)
    try:
        assert isinstance(previous, LinearRule) and rule_for(MyLinear(2, 2)) is rule
    finally:
        register_layer(nn.Linear, previous)


@pytest.mark.parametrize("cls", [int, "ScaledLinear", ScaledLinear(2, 2), None])
def test_register_layer_refuses_a_cls_that_is_not_a_module_class(cls):
    with pytest.raises(TypeError, match="^cls: "):
        register_layer(cls, ScaledLinearRule())


@pytest.mark.parametrize("rule", [ScaledLinearRule, "linear", {"weight": 0}, LinearRule])
def test_register_layer_refuses_a_rule_that_is_not_a_layer_rule(rule):
    with pytest.raises(TypeError, match="^rule: "):
        register_layer(ScaledLinear, rule)
    assert rule_for(ScaledLinear(2, 2)) is None


def test_a_rule_whose_dims_do_not_match_the_layer_pins_it():
    class Wrong(ScaledLinearRule):
        def in_channels(self, layer: nn.Module) -> dict[str, int]:
            return {"weight": 0, "scale": 0}

    previous = register_layer(ScaledLinear, Wrong())
    try:
        model = nn.Sequential(nn.Linear(16, 32), ScaledLinear(32, 8), nn.Linear(8, 4)).eval()
        x = torch.randn(8, 16)
        small = dsx.prune(model, 0.3, structured=True, example_inputs=x)
    finally:
        register_layer(ScaledLinear, previous)
    assert "not 32 channels" in dsx.history(small)[-1]["info"]["skipped"]["0"]
    assert small(x).shape == (8, 4)
