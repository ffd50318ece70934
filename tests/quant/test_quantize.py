import math
import sys

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.quant import Int8Static, valid_formats
from dsx.quant.embedding import QuantizedEmbedding
from dsx.quant.linear import Int8Linear, Int8StaticLinear, fp8_supported
from dsx.quant.config import EmbeddingOnly

CPU_FP8 = fp8_supported(torch.device("cpu")) is None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h)
        return self.head(h + self.mlp(h))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def ids():
    return torch.randint(0, 50, (4, 12))


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (4, 12), generator=g) for _ in range(n)]


def cosine(a, b):
    return nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def formats():
    out = ["int8", "int8_w7", "int8_weight_only", "fp8_weight_only", "int8_static", "embedding_int8", "embedding_int4"]
    return out + (["fp8"] if CPU_FP8 else [])


@pytest.mark.parametrize("fmt", formats())
def test_every_format_runs_verifies_and_reloads_bit_exact(fmt, net, ids, tmp_path):
    q = dsx.quantize(net, fmt, example_inputs=ids, calibration=batches() if fmt == "int8_static" else None,
                     progress=False)
    entry = dsx.history(q)[-1]
    assert entry["transform"] == "quantize" and entry["error"]["max_rel"] <= entry["error"]["tolerance"]
    assert cosine(q(ids), net(ids)) > 0.99
    assert entry["info"]["bytes_after"] < entry["info"]["bytes_before"]
    dsx.save(q, tmp_path / "q")
    again = dsx.load(Net().eval(), tmp_path / "q")
    assert torch.equal(again(ids), q(ids))
    for k, v in q.state_dict().items():
        assert torch.equal(again.state_dict()[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_int8_replaces_every_linear_and_leaves_the_caller_alone(net, ids):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = dsx.quantize(net, "int8", example_inputs=ids)
    assert all(isinstance(m, Int8Linear) for m in (q.attn, q.mlp[0], q.mlp[2], q.head))
    assert isinstance(q.emb, nn.Embedding)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert isinstance(net.attn, nn.Linear)
    assert dsx.history(q)[-1]["config"]["layers"] == ["attn", "head", "mlp.0", "mlp.2"]


def test_embeddings_option_quantizes_the_table_too(net, ids):
    q = dsx.quantize(net, dsx.quant.Int8Dynamic(embeddings=4), example_inputs=ids)
    assert isinstance(q.emb, QuantizedEmbedding) and isinstance(q.head, Int8Linear)


def test_skip_by_name_and_regex_and_filter_fn(net, ids):
    q = dsx.quantize(net, "int8", skip=["head", "re:mlp\\.\\d"], example_inputs=ids)
    assert isinstance(q.attn, Int8Linear)
    assert all(isinstance(m, nn.Linear) and not isinstance(m, Int8Linear) for m in (q.head, q.mlp[0], q.mlp[2]))
    assert dsx.history(q)[-1]["info"]["skipped"] == {"head": "skip", "mlp.0": "skip", "mlp.2": "skip"}
    q = dsx.quantize(net, "int8", filter_fn=lambda name, m: m.out_features != 10)
    assert not isinstance(q.head, Int8Linear) and isinstance(q.mlp[0], Int8Linear)


def test_skip_pattern_matching_nothing_warns(net):
    with pytest.warns(UserWarning, match="matches no module"):
        dsx.quantize(net, "int8", skip=["lm_head"])


def test_unknown_format_lists_the_valid_ones(net):
    with pytest.raises(ValueError, match="valid formats are") as e:
        dsx.quantize(net, "int3")
    for fmt in ("int8", "fp8", "int8_static", "nf4"):
        assert fmt in str(e.value)
    assert "int8_static" in valid_formats()


def test_bad_calibration_data(net):
    with pytest.raises(ValueError, match="empty"):
        dsx.quantize(net, "int8_static", calibration=[])
    with pytest.raises(ValueError, match="calibration data"):
        dsx.quantize(net, "int8_static")
    bad = torch.randn(2, 5, 32)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        dsx.quantize(nn.Sequential(nn.Linear(32, 8)), "int8_static", calibration=[torch.randn(2, 32), bad])
    with pytest.raises(ValueError, match="(?i)inf"):
        dsx.quantize(nn.Sequential(nn.Linear(32, 8)), "int8_static", calibration=[torch.full((2, 32), math.inf)])


def test_qat_needs_a_format_that_has_it(net):
    with pytest.raises(ValueError, match="no quantization-aware training"):
        dsx.quantize(net, "fp8_weight_only", qat=True)


def test_quantizing_twice_is_refused(net):
    q = dsx.quantize(net, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        dsx.quantize(q, "int8_weight_only")


def test_fp8_on_a_device_without_it_is_refused(net, monkeypatch):
    reason = "fp8 needs a CUDA GPU with compute capability >= 8.9 (this one has 8.0)"
    monkeypatch.setattr(sys.modules["dsx.quant.config"], "fp8_supported", lambda device: reason)
    with pytest.raises(ValueError, match=r"config: fp8 needs .* use 'fp8_weight_only' or 'int8'"):
        dsx.quantize(net, "fp8")


def test_bad_arguments():
    with pytest.raises(TypeError, match="skip"):
        dsx.Quantize("int8", skip="head")
    with pytest.raises(TypeError, match="skip: expected a list of names or 're:' patterns, got None"):
        dsx.Quantize("int8", skip=None)
    with pytest.raises(ValueError, match="max_error"):
        dsx.Quantize("int8", max_error=-1)
    with pytest.raises(ValueError, match="observer"):
        Int8Static(observer="median")
    with pytest.raises(ValueError, match="smoothquant"):
        Int8Static(smoothquant=1.5)
    with pytest.raises(TypeError, match="config"):
        dsx.Quantize(8)
    for bad in (float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="max_error"):
            dsx.Quantize("int8", max_error=bad)
    with pytest.raises(ValueError, match="metric: expected one of"):
        dsx.Quantize("int8", metric="l2")
    with pytest.raises(TypeError, match="metric: expected one of"):
        dsx.Quantize("int8", metric=3)
    with pytest.raises(ValueError, match="dtype: expected None or one of"):
        dsx.quant.Int8Dynamic(dtype="float64")
    with pytest.raises(ValueError, match="dtype: the bf16 format computes in 'bfloat16'"):
        dsx.quant.BFloat16(dtype="float16")


def test_bf16_and_mixed_int8_bf16_keep_the_callers_dtypes(net, ids):
    with torch.no_grad():
        ref = net(ids)
    for fmt in ("bf16", dsx.quant.Int8Dynamic(dtype="bfloat16")):
        q = dsx.quantize(net, fmt, example_inputs=ids, progress=False)
        with torch.no_grad():
            out = q(ids)
        assert out.dtype == torch.float32 and type(q) is type(net)
        assert dsx.history(q)[-1]["error"]["max_rel"] < 0.1
        assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.99
    q = dsx.quantize(net, dsx.quant.Int8Dynamic(dtype="bfloat16"), progress=False)
    assert q.head.weight.dtype == torch.int8 and q.head.weight_scale.dtype == torch.float32
    assert q.head.bias.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="already computes in"):
        dsx.quantize(dsx.quantize(net, "bf16", progress=False), dsx.quant.Int8Dynamic(dtype="bfloat16"))


def test_cosine_and_callable_metrics_drive_the_budget(net, ids):
    q = dsx.quantize(net, "int8", metric="cosine", max_error=0.01, example_inputs=ids, progress=False)
    err = dsx.history(q)[-1]["error"]
    assert err["metric"] == "cosine_error" and err["cosine_error"] <= 0.01
    calls = []

    def metric(model):
        calls.append(type(model).__name__)
        return 1.0  # nothing holds: every layer stays float

    q = dsx.quantize(net, "int8", metric=metric, max_error=0.5, example_inputs=ids, progress=False)
    assert calls and dsx.history(q)[-1]["info"]["quantized"] == 0


def test_outside_tolerance_is_an_error(net, ids, monkeypatch):
    monkeypatch.setattr(EmbeddingOnly, "tolerance", 1e-6)
    with pytest.raises(dsx.VerificationError, match="over the tolerance"):
        dsx.quantize(net, "embedding_int4", example_inputs=ids)


def test_a_budget_no_layer_meets_keeps_everything_float(net, ids):
    q = dsx.quantize(net, "embedding_int4", max_error=1e-9, example_inputs=ids, progress=False)
    assert dsx.history(q)[-1]["info"]["kept_float"] == ["emb"]
    assert torch.equal(q(ids), net(ids))


def test_accuracy_budget_keeps_the_most_sensitive_layers_float(ids):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[2].weight[:, 0] *= 300  # one outlier column: per-channel int8 loses the rest of that layer
    x = torch.randn(16, 32)
    full = dsx.quantize(model, "int8", verify=False)
    full_err = (full(x) - model(x)).abs().max() / model(x).abs().max()
    budget = float(full_err) / 4
    q = dsx.quantize(model, "int8", max_error=budget, calibration=[x], example_inputs=x, progress=False)
    info = dsx.history(q)[-1]["info"]
    assert "2" in info["kept_float"] and 0 < info["quantized"] < 3
    assert ((q(x) - model(x)).abs().max() / model(x).abs().max()).item() <= budget


def test_percentile_and_mse_beat_minmax_with_outliers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    heavy_tailed = torch.distributions.StudentT(2.0)  # rare large activations, like transformer outliers
    calib = [heavy_tailed.sample((256, 64)) for _ in range(4)]
    x = heavy_tailed.sample((1024, 64))

    def quantized(observer):
        return dsx.quantize(model, Int8Static(observer=observer), calibration=calib, verify=False, progress=False)

    def err(observer):
        return ((quantized(observer)(x) - model(x)) ** 2).mean().item()

    minmax = err("minmax")
    assert err("percentile") < 0.8 * minmax and err("mse") < 0.8 * minmax
    assert quantized("entropy")[0].input_scale < quantized("minmax")[0].input_scale


def test_smoothquant_helps_with_activation_outlier_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    scale = torch.ones(64)
    scale[:4] = 60.0
    calib = [torch.randn(128, 64) * scale for _ in range(3)]
    x = torch.randn(256, 64) * scale

    def err(cfg):
        q = dsx.quantize(model, cfg, calibration=calib, verify=False, progress=False)
        return ((q(x) - model(x)) ** 2).mean().item(), q

    plain, _ = err(Int8Static())
    smoothed, q = err(Int8Static(smoothquant=0.5))
    assert smoothed < plain / 2
    assert isinstance(q[0], Int8StaticLinear) and q[0].smooth is not None


def test_static_scales_come_from_the_calibration_range():
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    q = dsx.quantize(model, "int8_static", calibration=[torch.full((2, 8), 3.0), torch.full((2, 8), -5.0)])
    assert q[0].input_scale.item() == pytest.approx(5.0 / 127)


def test_quantize_then_optimize_and_compile(net, ids):
    q = dsx.quantize(net, "int8")
    fast = dsx.Fuse()(q, ids)
    assert torch.allclose(fast(ids), q(ids), rtol=1e-4, atol=1e-5)
    compiled = torch.compile(q, backend="dsx")
    assert torch.allclose(compiled(ids), q(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot apply 'quantize' after 'fuse'"):
        dsx.quantize(fast, "int8")


def test_recipe_round_trip(net, ids):
    recipe = dsx.to_recipe(dsx.compose(dsx.Quantize("int8", skip=["head"]), dsx.Fuse()))
    again = dsx.from_recipe(recipe)
    q = again(net, ids)
    assert not isinstance(q.head, Int8Linear) if hasattr(q, "head") else True
    assert [e["transform"] for e in dsx.history(q)] == ["quantize", "fuse"]


def test_summary_shows_the_smaller_model(net, ids):
    q = dsx.quantize(net, "int8", example_inputs=ids)
    text = str(dsx.summary(q))
    assert "int8" in text and "quantize" in text


def test_quantizing_nothing_warns_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with pytest.warns(UserWarning, match="quantize: no layer was quantized to 'int8' \\(no eligible module\\)"):
        out = dsx.quantize(model, "int8", progress=False)
    assert [type(m) for m in out] == [nn.ReLU, nn.Tanh]
    with pytest.warns(UserWarning, match="left float: \\{'0': 'skip'\\}"):
        dsx.quantize(nn.Sequential(nn.Linear(4, 4)), "int8", skip=["0"], progress=False)


def test_multihead_attention_out_proj_stays_float():
    """nn.MultiheadAttention's forward reads out_proj.weight itself (SigLIP's pooling head): it stays float."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.mlp = nn.Linear(32, 32)

        def forward(self, x):
            return self.mlp(self.attn(x, x, x, need_weights=False)[0])

    model, x = Pool().eval(), torch.randn(2, 5, 32)
    q = dsx.quantize(model, "int8", example_inputs=x, progress=False)
    assert isinstance(q.mlp, Int8Linear) and type(q.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert "MultiheadAttention" in dsx.history(q)[-1]["info"]["skipped"]["attn.out_proj"]
    assert cosine(q(x), model(x)) > 0.999
