import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from dsx.graph.fx_utils import finish
from dsx.graph.passes.remove_dropout import remove_dropout
from tests.graph.pass_testing import export, targets

aten = torch.ops.aten
DROPOUT_OPS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
               aten.feature_alpha_dropout.default, aten.native_dropout.default, aten.alias.default}


class Dropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.drop2d = nn.Dropout(0.3), nn.Dropout2d(0.2)
        self.alpha, self.feature_alpha = nn.AlphaDropout(0.2), nn.FeatureAlphaDropout(0.1)

    def forward(self, x):
        y = self.feature_alpha(self.alpha(self.drop2d(self.drop(x))))
        return aten.alias(F.dropout(y, 0.0, training=True)) * 2


def test_eval_dropout_p0_and_alias_removed():
    x = torch.randn(2, 3, 4, 4)
    m = Dropouts().eval()
    gm = export(m, x)
    assert remove_dropout(gm) == 6
    finish(gm)
    assert not DROPOUT_OPS & set(targets(gm))
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def test_training_dropout_kept():
    x = torch.randn(2, 3, 4, 4)
    gm = export(Dropouts().train(), x)
    # only the p=0 dropout and the alias are no-ops in training mode
    assert remove_dropout(gm) == 2
    finish(gm)
    kept = [n for n in gm.graph.nodes if n.target in DROPOUT_OPS]
    assert [n.target for n in kept] == [aten.dropout.default, aten.feature_dropout.default,
                                        aten.alpha_dropout.default, aten.feature_alpha_dropout.default]
    assert all(n.args[2] is True and n.args[1] > 0 for n in kept)


def _native(train, use_mask):
    def f(x):
        out = aten.native_dropout.default(x, 0.5, train)
        return out[0] + 1 if not use_mask else out[0] * out[1]
    return fx.symbolic_trace(f)


@pytest.mark.parametrize("train,use_mask,removed", [(False, False, 1), (True, False, 0), (False, True, 0)])
def test_native_dropout(train, use_mask, removed):
    gm = _native(train, use_mask)
    x = torch.randn(5, 7)
    assert remove_dropout(gm) == removed
    finish(gm)
    assert (aten.native_dropout.default in targets(gm)) == (not removed)
    if removed:
        assert operator.getitem not in targets(gm)
        torch.testing.assert_close(gm(x), x + 1)


def test_dropout_feeding_output_and_several_users():
    class M(nn.Module):
        def forward(self, x):
            y = F.dropout(x, 0.5, training=False)
            return y, y * 3

    x = torch.randn(4, 8)
    gm = export(M(), x)
    assert remove_dropout(gm) == 1
    finish(gm)
    out = gm(x)
    torch.testing.assert_close(out[0], x)
    torch.testing.assert_close(out[1], x * 3)
