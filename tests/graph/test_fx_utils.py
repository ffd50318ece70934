import torch
import torch.nn as nn

from dsx.graph.fx_utils import (
    Rewrite, add_constant, drop_unused_state, erase_dead, get_constant, is_call, only_user, rewrite,
)

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


def _relu_to_abs(check):
    """A Rewrite turning ``relu(x)`` into ``abs(x)`` when ``check`` allows it."""
    return Rewrite(lambda x: aten.relu.default(x), lambda bound: lambda x: aten.abs.default(x), check)


def test_rewrite_replaces_checked_matches_and_records_example_values():
    gm = _graph()
    seen = []
    assert rewrite(gm, [_relu_to_abs(lambda bound, out: seen.append((bound, out)) or True)]) == 1
    (bound, out), = seen
    assert is_call(bound["x"], aten.linear.default) and out.target == aten.relu.default
    (new,) = [n for n in gm.graph.nodes if is_call(n, aten.abs.default)]
    assert new.meta["val"].shape == (2, 3) and not any(is_call(n, aten.relu.default) for n in gm.graph.nodes)
    gm.recompile()
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), torch.nn.functional.linear(x, gm.get_parameter("0.weight"),
                                                                 gm.get_parameter("0.bias")).abs())


def test_rewrite_leaves_rejected_matches():
    gm = _graph()
    assert rewrite(gm, [_relu_to_abs(lambda bound, out: False)]) == 0
    assert any(is_call(n, aten.relu.default) for n in gm.graph.nodes)


def test_erase_dead_keeps_used_nodes():
    gm = _graph()
    linear = next(n for n in gm.graph.nodes if is_call(n, aten.linear.default))
    relu = only_user(linear)
    erase_dead(gm, [linear])
    assert linear in gm.graph.nodes
    relu.replace_all_uses_with(linear)
    erase_dead(gm, [linear, relu])
    assert relu not in gm.graph.nodes and linear in gm.graph.nodes
