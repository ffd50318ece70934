import pytest
import torch
import torch.nn as nn

from dsx.quant.smoothquant import smooth_linear, smoothing_scales


def outlier_activations(k=64, outliers=(3, 17, 40)):
    x = torch.randn(32, k)
    x[:, list(outliers)] *= 50
    return x


def flatness(absmax):
    return (absmax.max() / absmax.median()).item()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_smoothing_preserves_the_layer_output(alpha):
    x = outlier_activations()
    linear = nn.Linear(64, 24)
    reference = linear(x)
    s = smoothing_scales(x.abs().amax(0), linear.weight, alpha)
    assert s.shape == (64,) and s.dtype == torch.float32 and bool((s > 0).all())
    smooth_linear(linear, s)
    torch.testing.assert_close(linear(x / s), reference, rtol=1e-5, atol=1e-4)


def test_smoothing_matches_the_formula_and_flattens_activations():
    x = outlier_activations()
    weight = torch.randn(24, 64)
    act_max, w_max = x.abs().amax(0), weight.abs().amax(0)
    s = smoothing_scales(act_max, weight, 0.5)
    torch.testing.assert_close(s, act_max.sqrt() / w_max.sqrt())
    smoothed = (x / s).abs().amax(0)
    assert flatness(smoothed) < flatness(act_max) / 4
    assert flatness(act_max) > 20


def test_zero_channels_get_unit_scale_and_nothing_is_infinite():
    act_max = torch.tensor([0.0, 2.0, 3.0, 1e-30])
    weight = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.5, 0.0, -1.0, 1.0]])
    s = smoothing_scales(act_max, weight, 0.5)
    assert s[0] == 1 and s[1] == 1
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert s[2] == pytest.approx((3.0 / 2.0) ** 0.5)


def test_several_weights_sharing_an_input_use_the_combined_column_max():
    act_max = torch.rand(16) + 0.5
    q, k = torch.randn(8, 16), torch.randn(4, 16) * 10
    expected = smoothing_scales(act_max, torch.cat([q, k]), 0.6)
    torch.testing.assert_close(smoothing_scales(act_max, [q, k], 0.6), expected)


def test_errors():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"alpha: expected a number in \[0, 1\]"):
        smoothing_scales(torch.ones(8), weight, 1.5)
    with pytest.raises(ValueError, match="act_absmax: expected 8 channels"):
        smoothing_scales(torch.ones(6), weight)
    with pytest.raises(ValueError, match="act_absmax: expected finite non-negative"):
        smoothing_scales(torch.full((8,), float("nan")), weight)
    with pytest.raises(TypeError, match="weight: expected a 2-D Tensor"):
        smoothing_scales(torch.ones(8), torch.ones(8))
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        smooth_linear(nn.Conv1d(8, 4, 1), torch.ones(8))
    with pytest.raises(ValueError, match=r"scales: expected a Tensor of shape \(8,\)"):
        smooth_linear(nn.Linear(8, 4), torch.ones(4))
    with pytest.raises(ValueError, match="finite positive"):
        smooth_linear(nn.Linear(8, 4), torch.zeros(8))
