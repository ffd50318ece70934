import math

import pytest
import torch

from dsx.quant.observers import (
    OBSERVERS,
    ChannelAbsMax,
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)


def fake_quant(x, scale):
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


@pytest.fixture(scope="module")
def outlier_data():
    """A Gaussian bulk (2**20 values) and three large outliers."""
    gen = torch.Generator().manual_seed(0)
    bulk = torch.randn(1 << 20, generator=gen)
    return bulk, torch.cat([bulk, torch.tensor([20.0, -18.0, 19.0])])


def test_minmax_is_the_exact_abs_max_over_batches():
    obs = MinMaxObserver()
    batches = [torch.randn(3, 5), torch.randn(7) * 4, torch.randn(2, 2, 2).half()]
    for b in batches:
        obs.update(b)
    expected = max(b.abs().max().item() for b in batches)
    assert obs.amax() == expected
    assert obs.scale() == expected / 127
    assert obs.count == 15 + 7 + 8


@pytest.mark.parametrize("name", ["percentile", "mse", "entropy"])
def test_histogram_observers_clip_outliers_and_beat_minmax_on_the_bulk(name, outlier_data):
    bulk, data = outlier_data
    reference = MinMaxObserver()
    reference.update(data)
    obs = make_observer(name)
    for chunk in data.split(300_000):
        obs.update(chunk)
    assert obs.amax() < reference.amax() / 2
    assert obs.amax() > 3.0  # clips the outliers, not the bulk
    bulk_error = (fake_quant(bulk, obs.scale()) - bulk).pow(2).mean()
    minmax_error = (fake_quant(bulk, reference.scale()) - bulk).pow(2).mean()
    assert bulk_error < minmax_error / 4


def test_mse_observer_matches_a_brute_force_search_on_the_raw_data(outlier_data):
    _, data = outlier_data
    obs = MSEObserver()
    obs.update(data)
    best = min((fake_quant(data, t / 127) - data).pow(2).mean().item() for t in torch.linspace(2, 20, 181).tolist())
    assert (fake_quant(data, obs.scale()) - data).pow(2).mean().item() <= best * 1.01


def _reference_entropy_amax(hist, width, maximum, levels=128):
    """A direct loop over the candidates, in the style of TensorRT's entropy calibrator."""
    used = int(hist.nonzero().max()) + 1
    best, best_i = math.inf, used
    for i in range(levels, used + 1):
        p = hist[:i].clone()
        p[i - 1] += hist[i:].sum()
        p /= p.sum()
        candidate = hist[:i]
        q = torch.zeros(i, dtype=torch.float64)
        merged = i // levels
        for j in range(levels):
            stop = i if j == levels - 1 else (j + 1) * merged
            group = candidate[j * merged:stop]
            nonzero = group > 0
            if nonzero.any():
                q[j * merged:stop][nonzero] = group.sum() / nonzero.sum()
        q /= q.sum()
        if ((p > 0) & (q == 0)).any():
            continue
        mask = p > 0
        kl = (p[mask] * (p[mask] / q[mask]).log()).sum().item()
        if kl < best:
            best, best_i = kl, i
    return min(best_i * width, maximum)


@pytest.mark.parametrize("kind", ["gaussian_outliers", "laplace", "sparse"])
def test_entropy_observer_matches_a_direct_kl_loop(kind):
    gen = torch.Generator().manual_seed(1)
    if kind == "gaussian_outliers":
        data = torch.cat([torch.randn(20_000, generator=gen), torch.randn(30, generator=gen) * 12])
    elif kind == "laplace":
        data = torch.empty(20_000).exponential_(generator=gen) * torch.randn(20_000, generator=gen).sign()
    else:
        data = torch.randn(20_000, generator=gen).relu() ** 3
    obs = EntropyObserver(bins=512)
    obs.update(data)
    width = obs.range_max() / obs.bins
    expected = _reference_entropy_amax(obs.histogram(), width, obs.state()["max"].item())
    assert obs.amax() == pytest.approx(expected, rel=1e-12)
    if kind == "gaussian_outliers":
        assert obs.amax() < data.abs().max().item()


def test_percentile_interpolates_inside_a_bin():
    obs = PercentileObserver(percentile=50, bins=256)
    obs.update(torch.linspace(0, 1, 100_001))
    assert obs.amax() == pytest.approx(0.5, abs=1e-3)
    full = PercentileObserver(percentile=100)
    full.update(torch.tensor([0.1, -3.0, 2.0]))
    assert full.amax() == 3.0


def _shards():
    gen = torch.Generator().manual_seed(2)
    a = [torch.randn(5000, generator=gen) * 0.01, torch.randn(3000, generator=gen) * 0.3]
    b = [torch.randn(4000, generator=gen) * 7, torch.zeros(10), torch.randn(2000, generator=gen).double() * 40]
    return a, b


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_merging_two_shards_equals_one_observer_on_the_union(name):
    a, b = _shards()
    union, left, right = make_observer(name), make_observer(name), make_observer(name)
    for x in a + b:
        union.update(x)
    for x in a:
        left.update(x)
    for x in b:
        right.update(x)
    merged = make_observer(name).merge(left).merge(right)
    other_way = right.merge(left)
    for candidate in (merged, other_way):
        assert candidate.amax() == union.amax()
        for key, value in union.state().items():
            assert torch.equal(candidate.state()[key], value), key


@pytest.mark.parametrize("name", ["percentile", "mse", "entropy"])
def test_histogram_state_does_not_depend_on_batch_order(name):
    a, b = _shards()
    forward, backward = make_observer(name), make_observer(name)
    for x in a + b:
        forward.update(x)
    for x in reversed(a + b):
        backward.update(x)
    assert torch.equal(forward.state()["hist"], backward.state()["hist"])
    assert forward.amax() == backward.amax()


def test_rebinning_when_the_max_grows():
    values = torch.tensor([0.1, 0.2, 0.3, 2.5, 0.0])
    obs = PercentileObserver(bins=256)
    obs.update(values[:3])
    assert obs.range_max() == 0.5
    assert obs.histogram()[[51, 102, 153]].tolist() == [1.0, 1.0, 1.0]
    obs.update(values[3:])
    assert obs.range_max() == 4.0
    expected = torch.zeros(256, dtype=torch.float64)
    for v in values.double().tolist():
        expected[math.floor(v * 256 / 4.0)] += 1
    assert torch.equal(obs.histogram(), expected)
    direct = PercentileObserver(bins=256)
    direct.update(values)
    assert torch.equal(direct.histogram(), obs.histogram())
    obs.update(torch.tensor([1e6]))  # growth by more than log2(bins) doublings puts the old mass in bin 0
    assert obs.histogram()[0] == 5 and obs.histogram()[1:].sum() == 1


def test_distributed_protocol_with_grow_range_and_load_state():
    a, b = _shards()
    ranks = [PercentileObserver(), PercentileObserver()]
    union = PercentileObserver()
    for obs, shard in zip(ranks, (a, b)):
        for x in shard:
            obs.update(x)
            union.update(x)
    global_max = torch.stack([r.state()["max"] for r in ranks]).amax()
    for r in ranks:
        r.grow_range(global_max)
    total = sum(r.state()["hist"] for r in ranks)
    for r in ranks:
        r.load_state({"max": global_max, "hist": total})
        assert r.amax() == union.amax()


def test_power_of_two_and_tiny_values_bin_exactly():
    obs = PercentileObserver(bins=256)
    obs.update(torch.tensor([4.0, 2.0, 1e-30], dtype=torch.float64))
    assert obs.range_max() == 8.0
    assert obs.histogram()[[0, 64, 128]].tolist() == [1.0, 1.0, 1.0]


def test_all_zero_data_and_empty_observers():
    for name in OBSERVERS:
        obs = make_observer(name)
        with pytest.raises(RuntimeError, match="no data observed"):
            obs.amax()
        obs.update(torch.zeros(4))
        obs.update(torch.zeros(0))
        assert obs.amax() == 0.0 and obs.scale() == 1.0 and obs.count == 4


def test_observer_argument_errors():
    with pytest.raises(ValueError, match="entropy, minmax, mse, percentile"):
        make_observer("histogram")
    with pytest.raises(ValueError, match="percentile: expected a number in"):
        PercentileObserver(percentile=0)
    with pytest.raises(ValueError, match="bins: expected a power of two"):
        EntropyObserver(bins=1000)
    with pytest.raises(ValueError, match="num_candidates"):
        MSEObserver(num_candidates=1)
    with pytest.raises(ValueError, match="NaN or inf"):
        MinMaxObserver().update(torch.tensor([1.0, math.inf]))
    with pytest.raises(TypeError, match="floating-point"):
        EntropyObserver().update(torch.arange(3))
    with pytest.raises(TypeError, match="expected a MSEObserver"):
        MSEObserver().merge(EntropyObserver())
    with pytest.raises(ValueError, match="expected 2048 bins"):
        MSEObserver().merge(MSEObserver(bins=4096))
    with pytest.raises(ValueError, match="keys"):
        MinMaxObserver().load_state({"max": torch.tensor(1.0)})


def test_channel_absmax_tracks_and_merges():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 5, 4, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 3.0]) for _ in range(4)]
    union, left, right = ChannelAbsMax(), ChannelAbsMax(), ChannelAbsMax()
    for i, x in enumerate(batches):
        union.update(x)
        (left if i % 2 else right).update(x)
    expected = torch.stack([x.abs().reshape(-1, 4).amax(0) for x in batches]).amax(0)
    assert torch.equal(union.amax(), expected)
    assert torch.equal(ChannelAbsMax().merge(left).merge(right).amax(), expected)
    assert union.count == 40 and union.channels == 4
    with pytest.raises(ValueError, match="expected 4 channels"):
        union.update(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="no data"):
        ChannelAbsMax().amax()
