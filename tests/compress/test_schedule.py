import pytest
import torch
import torch.nn as nn

import dsx
from dsx.compress import PruningSchedule
from dsx.compress.masks import get_mask


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_cubic_ramp_is_monotone_and_reaches_amount():
    s = PruningSchedule(10, 110, 5, 0.8)
    values = [s.sparsity(t) for t in range(0, 200)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert s.sparsity(9) == s.sparsity(10) == 0.0
    assert s.sparsity(110) == pytest.approx(0.8) and s.sparsity(10_000) == pytest.approx(0.8)
    assert s.sparsity(109) < 0.8
    assert s.events() == [30, 50, 70, 90, 110]
    assert s.sparsity(30) == pytest.approx(0.8 * (1 - 0.8 ** 3))
    targets = [s.sparsity(t) for t in s.events()]
    increments = [b - a for a, b in zip([0.0, *targets], targets)]
    assert all(a > b for a, b in zip(increments, increments[1:])), "prunes fast early, slowly late"


def test_initial_sparsity_starts_at_start():
    s = PruningSchedule(0, 9, 3, 0.5, initial=0.2)
    assert s.events() == [0, 3, 6, 9]
    assert s.sparsity(0) == pytest.approx(0.2) and s.sparsity(9) == pytest.approx(0.5)


@pytest.mark.parametrize("args, match", [
    ((5, 5, 1, 0.5), "start: must be before end"),
    ((6, 5, 1, 0.5), "start: must be before end"),
    ((0, 10, 0, 0.5), "steps"),
    ((0, 10, 11, 0.5), "steps"),
    ((0, 10, 2, 1.0), "amount"),
    ((0, 10, 2, -0.1), "amount"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        PruningSchedule(*args)


def test_bad_initial_and_types():
    with pytest.raises(ValueError, match="initial"):
        PruningSchedule(0, 10, 2, 0.3, initial=0.5)
    with pytest.raises(TypeError, match="start"):
        PruningSchedule(0.5, 10, 2, 0.3)


def test_prune_during_training_then_reload(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = PruningSchedule(2, 12, 5, 0.75)
    x = torch.randn(8, 16)
    fired = []
    previous = None
    for step in range(15):
        if s.step(model, step):
            fired.append(step)
            mask = get_mask(model[0])
            assert previous is None or not (mask & ~previous).any(), "pruned weights stay pruned"
            previous = mask.clone()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if previous is not None:
            assert (model[0].weight[~previous] == 0).all()
    assert fired == s.events()
    for layer in (model[0], model[2]):
        assert int((layer.weight == 0).sum()) == round(0.75 * layer.weight.numel())
    assert not s.step(model, 100)
    assert [e["transform"] for e in dsx.history(model)] == ["prune"] * 5
    dsx.save(model, tmp_path)
    back = dsx.load(mlp(), tmp_path)
    assert torch.equal(back(x), model(x))


def test_skipped_calls_catch_up():
    model = mlp()
    s = PruningSchedule(0, 10, 5, 0.5, skip=["2"])
    assert s.step(model, 7) and not s.step(model, 7) and not s.step(model, 6)
    assert get_mask(model[2]) is None
    assert int((model[0].weight == 0).sum()) == round(s.sparsity(7) * model[0].weight.numel())
