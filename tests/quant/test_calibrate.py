import math

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.quant.calibrate import Observers, check_batches, observe_inputs
from dsx.quant.observers import MinMaxObserver, PercentileObserver


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 4)
        self.modes = []

    def forward(self, x, scale=1.0):
        self.modes.append(self.training)
        return self.fc2(self.drop(self.act(self.fc1(x * scale))))


def batches(n=3):
    return [torch.randn(5, 8) for _ in range(n)]


def hook_count(net):
    return sum(len(m._forward_pre_hooks) for m in net.modules())


def test_observes_first_positional_inputs_in_eval_mode():
    net = Net()
    data = batches()
    stats = observe_inputs(net, {"fc1": net.fc1, "fc2": net.fc2}, data, channel_absmax=True, progress=False)
    assert set(stats) == {"fc1", "fc2"} and isinstance(stats["fc1"], Observers)
    assert isinstance(stats["fc1"].activation, MinMaxObserver)
    x = torch.cat(data)
    assert stats["fc1"].activation.amax() == x.abs().max().item()
    with torch.no_grad():
        hidden = net.act(net.fc1(x))  # eval-mode dropout is the identity
    assert stats["fc2"].activation.amax() == pytest.approx(hidden.abs().max().item(), rel=1e-6)
    assert torch.equal(stats["fc1"].channel_absmax.amax(), x.abs().amax(0))
    assert net.modes == [False] * 3


def test_observer_name_kwargs_and_batch_forms():
    net = Net()
    data = [torch.randn(4, 8), (torch.randn(4, 8), 2.0), {"x": torch.randn(4, 8), "scale": 0.5}]
    stats = observe_inputs(net, {"fc1": net.fc1}, data, "percentile", percentile=99.0, progress=False)
    obs = stats["fc1"].activation
    assert isinstance(obs, PercentileObserver) and obs.percentile == 99.0 and obs.count == 3 * 4 * 8
    assert stats["fc1"].channel_absmax is None


def test_hooks_removed_and_modes_restored_after_success_and_failure():
    net = Net().train()
    net.drop.eval()  # a mixed-mode model keeps its per-module flags
    observe_inputs(net, {"fc1": net.fc1}, batches(), progress=False)
    assert hook_count(net) == 0
    assert net.training and net.fc1.training and not net.drop.training
    with pytest.raises(ValueError, match="calibration batch 1"):
        observe_inputs(net, {"fc1": net.fc1, "fc2": net.fc2}, [torch.randn(2, 8), torch.randn(2, 3)], progress=False)
    assert hook_count(net) == 0
    assert net.training and net.fc1.training and not net.drop.training


def test_module_never_called_keeps_an_empty_observer():
    net = Net()
    unused = nn.Linear(2, 2)
    net.extra = unused
    stats = observe_inputs(net, {"extra": unused}, batches(1), progress=False)
    assert stats["extra"].activation.count == 0


def test_progress_bar(capsys):
    net = Net()
    observe_inputs(net, {"fc1": net.fc1}, batches(), progress=False)
    assert "dsx calibrate" not in capsys.readouterr().err
    observe_inputs(net, {"fc1": net.fc1}, batches(), progress=True)
    assert "dsx calibrate" in capsys.readouterr().err


def test_check_batches_errors():
    with pytest.raises(ValueError, match="calibration: .* empty"):
        check_batches([])
    with pytest.raises(ValueError, match="calibration: .* empty"):
        check_batches(iter(()))
    with pytest.raises(ValueError, match=r"calibration batch 1: input args\[0\] contains NaN"):
        check_batches([torch.ones(2), torch.tensor([1.0, math.nan])])
    with pytest.raises(ValueError, match=r"calibration batch 0: input kwargs\['x'\] contains NaN or inf"):
        check_batches([{"x": torch.tensor([math.inf]), "ids": torch.ones(1, dtype=torch.long)}])
    with pytest.raises(TypeError, match="expected an iterable of batches"):
        check_batches(5)
    with pytest.raises(TypeError, match=r"wrap a single batch in a list"):
        check_batches(torch.randn(3, 8))
    with pytest.raises(TypeError, match="calibration batch 0"):
        check_batches([3])
    gen = (torch.randn(2, 8) for _ in range(2))
    assert len(check_batches(gen)) == 2


def test_observe_inputs_argument_errors():
    net = Net()
    with pytest.raises(ValueError, match="expected one of entropy, minmax, mse, percentile"):
        observe_inputs(net, {"fc1": net.fc1}, batches(), "kl", progress=False)
    with pytest.raises(ValueError, match="not a submodule"):
        observe_inputs(net, {"other": nn.Linear(8, 8)}, batches(), progress=False)
    with pytest.raises(ValueError, match="modules: expected at least one"):
        observe_inputs(net, {}, batches(), progress=False)
    with pytest.raises(TypeError, match="model"):
        observe_inputs(lambda x: x, {"fc1": net.fc1}, batches(), progress=False)
    assert hook_count(net) == 0


@pytest.mark.timeout(120)
def test_an_endless_calibration_iterator_stops_and_warns():
    import itertools

    from dsx.core.inputs import MAX_BATCHES

    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match=f"read the first {MAX_BATCHES} batches"):
        batches = check_batches(itertools.repeat(x))
    assert len(batches) == MAX_BATCHES
    with pytest.warns(UserWarning, match="read the first"):
        dsx.quantize(nn.Sequential(nn.Linear(16, 8)), "int8_static", calibration=itertools.repeat(x), progress=False)


def test_max_batches_bounds_what_quantize_reads():
    import itertools

    x = torch.randn(4, 16)
    read = []
    data = (read.append(i) or x for i in itertools.count())
    with pytest.warns(UserWarning, match="read the first 3 batches"):
        dsx.quantize(nn.Sequential(nn.Linear(16, 8)), "int8_static", calibration=data, max_batches=3, progress=False)
    assert len(read) == 4  # three taken, one more seen to know there were more
