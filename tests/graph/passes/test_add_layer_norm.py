"""Tests for the add_layer_norm graph pass: residual add + last-dim LayerNorm -> dsx.add_layer_norm."""

import operator

import pytest
import torch
import torch.nn as nn
from torch.export.graph_signature import InputKind

from dsx.graph.fx_utils import finish
from dsx.graph.passes.add_layer_norm import add_layer_norm
from tests.graph.pass_testing import export, randomize, rel_err, targets

aten = torch.ops.aten
FUSED = torch.ops.dsx.add_layer_norm.default


class PreNormBlock(nn.Module):
    """Two pre-norm residual sublayers and a final norm: the 2nd and 3rd LayerNorms read a residual add."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = x + self.fc1(self.ln1(x))
        h = h + self.fc2(self.ln2(h))
        return self.ln_f(h), h


class NativeLayerNorm(nn.Module):
    def __init__(self, d: int = 24):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x, r):
        return torch.native_layer_norm(x + r, [x.shape[-1]], self.weight, self.bias, 1e-5)[0]










def test_pre_norm_block_fused_and_matches_eager():
    block, x = randomize(PreNormBlock()), torch.randn(2, 5, 32)
    gm = export(block, x)
    assert add_layer_norm(gm) == 2
    finish(gm)
    ops = targets(gm)
    assert ops.count(FUSED) == 2 and ops.count(aten.layer_norm.default) == 1 and aten.add.Tensor not in ops
    for node in gm.graph.nodes:
        if node.target is operator.getitem:
            assert isinstance(node.meta["val"], torch.Tensor) and node.meta["val"].shape == (2, 5, 32)
    for out, ref in zip(gm(x), block(x)):
        assert rel_err(out, ref) < 1e-5


def test_native_layer_norm_fused():
    module, x, r = NativeLayerNorm(), torch.randn(3, 24), torch.randn(3, 24)
    gm = export(module, x, r)
    assert aten.native_layer_norm.default in targets(gm)
    assert add_layer_norm(gm) == 1
    finish(gm)
    assert FUSED in targets(gm) and aten.native_layer_norm.default not in targets(gm)
    assert rel_err(gm(x, r), module(x, r)) < 1e-5


def test_lifted_parameters_as_placeholders():
    block, x = randomize(PreNormBlock()), torch.randn(2, 5, 32)
    ep = torch.export.export(block.eval(), (x,), strict=False)
    gm = ep.graph_module
    assert add_layer_norm(gm) == 2
    finish(gm)
    params = [ep.state_dict[s.target] for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER]
    for out, ref in zip(gm(*params, x), block(x)):
        assert rel_err(out, ref) < 1e-5


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.shift = nn.LayerNorm(16), nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.ln(x + self.shift)


class TwoDimNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm((4, 16))

    def forward(self, x, r):
        return self.ln(x + r)


class ScaledAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)

    def forward(self, x, r):
        return self.ln(torch.add(x, r, alpha=2.0))


@pytest.mark.parametrize("module, n_inputs", [(Broadcast(), 1), (TwoDimNorm(), 2), (ScaledAdd(), 2)])
def test_not_fused(module, n_inputs):
    args = [torch.randn(3, 4, 16) for _ in range(n_inputs)]
    gm = export(module, *args)
    before = targets(gm)
    assert add_layer_norm(gm) == 0
    assert targets(gm) == before and FUSED not in before
