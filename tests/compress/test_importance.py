"""Channel importance scores over dependency-graph groups: dead channels score lowest for every criterion."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.compress.depgraph import build_depgraph
from dsx.compress.importance import IMPORTANCES, check_importance, group_scores
from dsx.core.inputs import normalize_inputs

DEAD = [0, 2, 4, 6]


class ConvBNConv(nn.Module):
    """conv a (8 channels) -> BN -> conv b; channels 0, 2, 4, 6 of a carry nothing (zero weights, zero BN scale)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.a.weight[DEAD] = 0
            self.a.bias[DEAD] = 0
            self.b.weight[:, DEAD] = 0
            self.bn.weight[DEAD] = 0

    def forward(self, x):
        return self.b(F.relu(self.bn(self.a(x)))).mean((2, 3))


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_dead_channels_score_below_live_ones(importance):
    torch.manual_seed(0)
    model = ConvBNConv()
    inputs = normalize_inputs(torch.randn(4, 3, 6, 6))
    graph = build_depgraph(model, inputs)
    groups = [g for g in graph.groups if g.reason is None]
    assert [g.key for g in groups] == ["a"]
    (scores,) = group_scores(model, graph, groups, importance, inputs)
    live = [i for i in range(8) if i not in DEAD]
    assert scores.shape == (8,) and scores[DEAD].max() < scores[live].min()


def test_unknown_importance_names_the_valid_ones():
    assert check_importance("l2") == "l2"
    with pytest.raises(ValueError, match=r"importance: expected one of \('l1', 'l2', 'taylor', 'bn_scale'\)"):
        check_importance("random")
