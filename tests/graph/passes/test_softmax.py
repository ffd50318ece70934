"""Tests for the scaled_masked_softmax graph pass: ``softmax(x * c [+ mask])`` and ``softmax(x + mask)`` over the
last dim become dsx.scaled_masked_softmax with eager numerics (tiny modules, tiny BERT / Llama eager attention);
other dims, other dtypes, shared intermediates and broadcasting x are left alone."""

import pytest
import torch
import torch.nn as nn

from dsx.graph.passes.softmax import scaled_masked_softmax
from tests.hf_models import tiny_hf
from tests.graph.pass_testing import export, fused_nodes, rel_err, targets

aten = torch.ops.aten
SOFTMAX = torch.ops.dsx.scaled_masked_softmax.default










class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


X = (2, 3, 4, 9)
CASES = {
    "mul": (lambda x, m: torch.softmax(x * 0.125, -1), 0.125, False),
    "div": (lambda x, m: torch.softmax(x / 4, dim=3), 0.25, False),
    "mul_add": (lambda x, m: torch.softmax(x * 0.5 + m, -1), 0.5, True),
    "mask_first": (lambda x, m: torch.softmax(m + x / 2.0, -1), 0.5, True),
    "add_only": (lambda x, m: torch.softmax(x + m, -1), 1.0, True),
    "hf_dtype": (lambda x, m: nn.functional.softmax(x * 3 + m, dim=-1, dtype=torch.float32), 3.0, True),
}


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 9), (2, 1, 4, 9), (9,)])
@pytest.mark.parametrize("case", list(CASES))
def test_fuses_supported_forms(case, mask_shape):
    fn, scale, has_mask = CASES[case]
    x, m = torch.randn(X), torch.randn(mask_shape)
    model = Fn(fn)
    gm = export(model, x, m)
    assert scaled_masked_softmax(gm) == 1
    gm.graph.lint()
    gm.recompile()
    (fused,) = fused_nodes(gm, SOFTMAX)
    assert fused.args[0].op == "placeholder" and (fused.args[1] is not None) == has_mask
    assert fused.args[2] == pytest.approx(scale) and fused.meta["val"].shape == X
    remaining = targets(gm)
    assert aten.softmax.int not in remaining and aten.add.Tensor not in remaining
    assert aten.mul.Tensor not in remaining and aten.div.Tensor not in remaining
    assert rel_err(gm(x, m), model(x, m)) < 1e-5


def test_tiny_hf_eager_attention():
    for name, layers in (("bert", 2), ("llama", 2)):
        model, kwargs = tiny_hf(name)
        extra = {} if name == "bert" else {"use_cache": False}
        gm = export(model, **kwargs, **extra)
        assert scaled_masked_softmax(gm) == layers
        gm.graph.lint()
        gm.recompile()
        assert aten.softmax.int not in targets(gm)
        assert all(n.args[1] is not None and n.args[2] == 0.25 for n in fused_nodes(gm, SOFTMAX))
        with torch.no_grad():
            assert rel_err(gm(**kwargs, **extra).last_hidden_state, model(**kwargs).last_hidden_state) < 1e-5


def test_mask_then_scale_keeps_the_mask_add():
    """``softmax((x + mask) * c)`` is not ``softmax(x * c + mask)``: the add stays, only the scale is fused."""
    model, x, m = Fn(lambda x, m: torch.softmax((x + m) * 0.5, -1)), torch.randn(X), torch.randn(2, 1, 1, 9)
    gm = export(model, x, m)
    assert scaled_masked_softmax(gm) == 1
    gm.recompile()
    (fused,) = fused_nodes(gm, SOFTMAX)
    assert fused.args[0].target == aten.add.Tensor and fused.args[1] is None and fused.args[2] == 0.5
    assert rel_err(gm(x, m), model(x, m)) < 1e-5


def test_shared_scaled_scores_keep_their_mul():
    model, x, m = Fn(lambda x, m: torch.softmax((s := x * 2) + m, -1) + s), torch.randn(X), torch.randn(9)
    gm = export(model, x, m)
    assert scaled_masked_softmax(gm) == 1
    gm.recompile()
    (fused,) = fused_nodes(gm, SOFTMAX)
    assert fused.args[0].target == aten.mul.Tensor and fused.args[2] == 1.0 and aten.mul.Tensor in targets(gm)
    assert rel_err(gm(x, m), model(x, m)) < 1e-5


NO_MATCH = {
    "dim0": (lambda x, m: torch.softmax(x * 0.5 + m, 0), [X, (2, 1, 1, 9)]),
    "dim1": (lambda x, m: torch.softmax(x * 0.5, 1), [X, (9,)]),
    "plain": (lambda x, m: torch.softmax(x, -1), [X, (9,)]),
    "scale_read_twice": (lambda x, m: (torch.softmax(s := x * 0.5, -1), s), [X, (9,)]),
    "sum_read_twice": (lambda x, m: torch.softmax(s := x + m, -1) + s, [X, (9,)]),
    "tensor_scale": (lambda x, m: torch.softmax(x * m, -1), [X, (9,)]),
    "both_broadcast": (lambda x, m: torch.softmax(x + m, -1), [(2, 1, 4, 9), (1, 3, 1, 9)]),
    "other_dtype": (lambda x, m: torch.softmax(x * 2, -1, dtype=torch.float64), [X, (9,)]),
    "bool_added": (lambda x, m: torch.softmax(x + (m > 0), -1), [X, (9,)]),
}


@pytest.mark.parametrize("case", list(NO_MATCH))
def test_no_match(case):
    fn, shapes = NO_MATCH[case]
    args = [torch.randn(s) for s in shapes]
    gm = export(Fn(fn), *args)
    before = targets(gm)
    assert scaled_masked_softmax(gm) == 0
    assert targets(gm) == before


def test_half_precision_input_with_fp32_mask_not_fused():
    x, m = torch.randn(X, dtype=torch.bfloat16), torch.randn(2, 1, 1, 9)
    gm = export(Fn(lambda x, m: torch.softmax(x * 0.5 + m, -1)), x, m)
    assert scaled_masked_softmax(gm) == 0
