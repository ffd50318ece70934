import io

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import dsx
from dsx.core.dist import all_reduce_scalar, distributed_active
from dsx.quant.sync import sync_observers
from dsx.quant import Int8Static
from dsx.quant.observers import OBSERVERS, ChannelAbsMax, make_observer
from tests.parallel.dist_utils import run_distributed

SMOOTH = Int8Static(observer="entropy", smoothquant=0.5)
BUDGET = 0.05


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _shard(rank, n=3):
    """Each rank's batches; rank 1's are wider (another histogram range) with an outlier channel."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(n):
        x = torch.randn(8, 16, generator=g) * (1 + 3 * rank)
        if rank == 1:
            x[:, 3] *= 5
        out.append(x)
    return out


def _quantize(config, data, **kwargs):
    q = dsx.quantize(_model(), config, calibration=data, progress=False, **kwargs)
    return q.state_dict(), dsx.history(q)[-1]["info"]["kept_float"]


def _observers(data):
    obs = {name: make_observer(name) for name in OBSERVERS}
    obs["channels"] = ChannelAbsMax()
    for x in data:
        for o in obs.values():
            o.update(x)
    return obs


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _calibrate(rank, world):
    data = _shard(rank)
    out = {"observers": {n: o.state() for n, o in sync_observers(_observers(data)).items()}}
    for name in OBSERVERS:
        out[name] = _quantize(Int8Static(observer=name), data)[0]
    out["smoothquant"] = _quantize(SMOOTH, data)[0]
    out["kept"] = _quantize("int8_static", data, max_error=BUDGET)[1]
    out["kept_local"] = _quantize("int8_static", data, max_error=BUDGET, distributed=False)[1]
    out["rank1_empty"] = _quantize(Int8Static(observer="percentile"), data if rank == 0 else [])[0]
    out["all_empty"] = _error(lambda: _quantize("int8_static", []))
    names = {"a": make_observer("minmax")} if rank == 0 else {"b": make_observer("minmax")}
    out["mismatch"] = _error(lambda: sync_observers(names))
    singles = [dist.new_group([r]) for r in range(world)]
    out["group_of_one"] = _quantize("int8_static", data, process_group=singles[rank])[0]
    out["max"] = all_reduce_scalar(float(rank), "max")
    buffer = io.BytesIO()
    torch.save(out, buffer)  # bytes, not shared-memory tensors, which die with the worker
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ranks():
    return [torch.load(io.BytesIO(raw)) for raw in run_distributed(_calibrate)]


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("observer", sorted(OBSERVERS))
def test_every_observer_gives_both_ranks_the_union_scales_bit_exactly(ranks, observer):
    union = _quantize(Int8Static(observer=observer), _shard(0) + _shard(1))[0]
    assert any(k.endswith("input_scale") for k in union)
    _assert_equal(ranks[0][observer], ranks[1][observer])
    _assert_equal(ranks[0][observer], union)
    alone = _quantize(Int8Static(observer=observer), _shard(0))[0]
    assert not torch.equal(alone["0.input_scale"], union["0.input_scale"])


def test_synced_observer_states_equal_one_observer_on_the_union(ranks):
    union = _observers(_shard(0) + _shard(1))
    for name, obs in union.items():
        for rank in ranks:
            _assert_equal(rank["observers"][name], obs.state())


def test_smoothquant_factors_and_scales_are_the_union_ones(ranks):
    union = _quantize(SMOOTH, _shard(0) + _shard(1))[0]
    assert any(k.endswith(".smooth") for k in union)
    _assert_equal(ranks[0]["smoothquant"], ranks[1]["smoothquant"])
    _assert_equal(ranks[0]["smoothquant"], union)


def test_accuracy_budget_keeps_the_same_layers_float_as_on_the_union(ranks):
    union = _quantize("int8_static", _shard(0) + _shard(1), max_error=BUDGET)[1]
    assert union and len(union) < 3
    assert ranks[0]["kept"] == ranks[1]["kept"] == union
    assert ranks[0]["kept_local"] == ranks[1]["kept_local"] == []


def test_a_rank_without_data_contributes_nothing(ranks):
    alone = _quantize(Int8Static(observer="percentile"), _shard(0))[0]
    _assert_equal(ranks[0]["rank1_empty"], alone)
    _assert_equal(ranks[1]["rank1_empty"], alone)


def test_no_data_on_any_rank_and_mismatched_observers_fail_on_every_rank(ranks):
    for rank in ranks:
        assert "empty on every rank" in rank["all_empty"]
        assert "different observers" in rank["mismatch"]


def test_a_group_of_one_rank_calibrates_locally(ranks):
    for rank, out in enumerate(ranks):
        _assert_equal(out["group_of_one"], _quantize("int8_static", _shard(rank))[0])
        assert out["max"] == 1.0


def test_without_a_process_group_nothing_is_synced():
    assert not distributed_active(None) and not distributed_active(False)
    with pytest.raises(ValueError, match="distributed: True needs an initialized"):
        distributed_active(True)
    with pytest.raises(ValueError, match="distributed: True needs an initialized"):
        _quantize("int8_static", _shard(0), distributed=True)
    with pytest.raises(TypeError, match="distributed: expected"):
        dsx.Quantize("int8_static", distributed="yes")
    obs = _observers(_shard(0))
    before = {n: o.state() for n, o in obs.items()}
    sync_observers(obs)
    for name, o in obs.items():
        _assert_equal(o.state(), before[name])
    assert all_reduce_scalar(2.5, "max") == 2.5
    with pytest.raises(ValueError, match="op: expected"):
        all_reduce_scalar(1.0, "min")
    with pytest.raises(TypeError, match="observers"):
        sync_observers([make_observer("minmax")])
