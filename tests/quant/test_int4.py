"""int4_weight_only: HQQ and RTN parameters, Int4WeightOnlyLinear (packing, reload, devices), the format through
dsx.quantize (skips, verification, bit-exact round trips, generate) and its bad inputs."""

import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import dsx
from dsx.quant import Int4WeightOnly
from dsx.quant.int4 import Int4WeightOnlyLinear, hqq_params, minmax_params, quantize_groups


def weight(n=64, k=256, seed=0):
    """A weight with heavy-tailed outliers, where the range-based scale is poor."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (1 + 4 * (torch.rand(n, k, generator=g) > 0.99))


def reconstruction_error(w, scale, zero, group_size):
    q = quantize_groups(w, scale, zero, group_size).float().view(w.shape[0], -1, group_size)
    return ((q - zero[..., None]) * scale[..., None] - w.view(w.shape[0], -1, group_size)).pow(2).sum().item()


class Mlp(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Linear(width, 40)

    def forward(self, x):
        return self.head(x + self.down(torch.relu(self.up(x))))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return Mlp().eval()


def test_rtn_codes_are_within_half_a_step():
    w = weight()
    scale, zero = minmax_params(w, 64)
    q = quantize_groups(w, scale, zero, 64)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    deq = ((q.float().view(64, -1, 64) - zero[..., None]) * scale[..., None]).view_as(w)
    assert ((deq - w).abs() <= scale.repeat_interleave(64, 1) / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_hqq_reconstructs_better_than_rtn(group_size):
    w = weight()
    rtn = reconstruction_error(w, *minmax_params(w, group_size), group_size)
    hqq = reconstruction_error(w, *hqq_params(w, group_size), group_size)
    assert hqq < 0.9 * rtn, (hqq, rtn)


def test_layer_matches_its_dequantized_weight_in_every_dtype():
    lin = nn.Linear(256, 48)
    layer = Int4WeightOnlyLinear.from_float(lin, group_size=64)
    assert layer.qweight.shape == (48, 128) and layer.scale.shape == (48, 4) and layer.packed is not None
    w = layer.dequantize()
    assert (w - lin.weight).abs().max() < layer.scale.max()
    for dtype, tol in [(torch.float32, 2e-2), (torch.bfloat16, 3e-2)]:
        x = torch.randn(5, 256).to(dtype)
        ref = nn.functional.linear(x.double(), w.double(), lin.bias.double())
        y = copy.deepcopy(layer).to(dtype)(x)
        assert y.dtype == dtype
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
    half = copy.deepcopy(layer).half()
    assert half.scale.dtype == torch.float32 and torch.equal(half.scale, layer.scale)  # casts reach the bias only
    assert half.bias.dtype == torch.float16 and torch.equal(half.scales_zeros, layer.scales_zeros)
    x = torch.randn(300, 256)  # many rows: the dequantizing path, fp32 exact
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)


def test_state_dict_holds_the_portable_form_and_reload_repacks(tmp_path):
    layer = Int4WeightOnlyLinear.from_float(nn.Linear(128, 32), group_size=32)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scale", "zero", "bias"}
    save_file(sd, tmp_path / "l.safetensors")
    fresh = Int4WeightOnlyLinear(128, 32, group_size=32)
    fresh.load_state_dict(load_file(tmp_path / "l.safetensors"))
    for key, value in sd.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh.packed, layer.packed)
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnlyLinear(100, 16, group_size=64)
    with pytest.raises(ValueError, match="algorithm"):
        Int4WeightOnlyLinear.from_float(nn.Linear(64, 16), group_size=32, algorithm="gptq")


@pytest.mark.parametrize("algorithm", ["hqq", "rtn"])
def test_quantize_verifies_and_round_trips_bit_exact(mlp, algorithm, tmp_path):
    x = torch.randn(4, 128)
    q = dsx.quantize(mlp, Int4WeightOnly(group_size=64, algorithm=algorithm), example_inputs=x, progress=False)
    assert isinstance(q.up, Int4WeightOnlyLinear) and isinstance(mlp.up, nn.Linear)  # the caller's model is intact
    entry = dsx.history(q)[-1]
    assert 0 < entry["error"]["max_rel"] <= entry["error"]["tolerance"]
    # int4 codes plus the CPU kernel's packed copy of them: about 2 x 4 bits a weight against 32
    assert entry["info"]["bytes_after"] < entry["info"]["bytes_before"] / 3
    dsx.save(q, tmp_path / "q")
    again = dsx.load(Mlp().eval(), tmp_path / "q")
    assert isinstance(again.up, Int4WeightOnlyLinear) and again.up.packed is not None
    for key, value in q.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(again(x), q(x))


def test_string_format_and_layers_it_cannot_group_stay_float(mlp):
    q = dsx.quantize(mlp, "int4_weight_only", progress=False)  # group 128: every in_features is a multiple
    assert all(isinstance(getattr(q, n), Int4WeightOnlyLinear) for n in ("up", "down", "head"))
    odd = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 8)).eval()
    q = dsx.quantize(odd, Int4WeightOnly(group_size=128), progress=False)
    assert isinstance(q[0], Int4WeightOnlyLinear) and isinstance(q[2], nn.Linear)
    assert "group_size" in dsx.history(q)[-1]["info"]["skipped"]["2"]


def test_hf_causal_lm_generates():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 96, (1, 6))
    q = dsx.quantize(model, Int4WeightOnly(group_size=64), example_inputs=ids, progress=False)
    assert type(q) is type(model)
    out = q.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(group_size=48), ValueError, "group_size"),
    (dict(group_size="128"), ValueError, "group_size"),
    (dict(algorithm="awq"), ValueError, "algorithm"),
    (dict(act_order=1), TypeError, "act_order"),
    (dict(damp=0.0), ValueError, "damp"),
    (dict(damp=True), ValueError, "damp"),
])
def test_config_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Int4WeightOnly(**kwargs)


def test_gptq_without_calibration_is_refused(mlp):
    with pytest.raises(ValueError, match="calibration"):
        dsx.quantize(mlp, Int4WeightOnly(algorithm="gptq"), progress=False)
    assert isinstance(mlp.up, nn.Linear)


def test_onnx_export_is_verified_in_onnxruntime(mlp, tmp_path):
    pytest.importorskip("onnxruntime")
    q = dsx.quantize(mlp, Int4WeightOnly(group_size=64), progress=False)
    result = dsx.export(q, torch.randn(2, 128), tmp_path / "q.onnx")
    assert result.max_rel is not None and 0 < result.max_rel < 2e-2  # the CPU kernel's bf16 vs the graph's fp32
    assert result.path.stat().st_size < 0.4 * sum(p.numel() * 4 for p in mlp.parameters())
