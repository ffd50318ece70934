import torch
import torch.nn as nn

from dsx.graph.fx_utils import add_constant, drop_unused_state, get_constant, is_call, only_user

aten = torch.ops.aten


def _graph():
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    return torch.export.export(m, (torch.randn(2, 3),), strict=False).module()


def test_matching_helpers_and_constants():
    gm = _graph()
    linear = next(n for n in gm.graph.nodes if is_call(n, aten.linear.default))
    assert is_call(only_user(linear), aten.relu.default)
    assert torch.equal(get_constant(gm, linear.args[1]), gm.get_parameter("0.weight"))
    assert get_constant(gm, linear.args[0]) is None


def test_add_constant_then_drop_the_unused_original():
    gm = _graph()
    linear = next(n for n in gm.graph.nodes if is_call(n, aten.linear.default))
    new = add_constant(gm, linear, "0.weight_scaled", gm.get_parameter("0.weight") * 2)
    linear.replace_input_with(linear.args[1], new)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert drop_unused_state(gm) == ["0.weight"]
    assert "0_weight_scaled" in dict(gm.named_parameters()) and "0.weight" not in gm.state_dict()
    assert gm(torch.randn(2, 3)).shape == (2, 3)
