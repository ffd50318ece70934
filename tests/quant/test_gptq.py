"""GPTQ (dsx.quant.gptq): the Hessian, one-layer quantization against round-to-nearest, and the block-sequential
pass over the tiny trained Llama fixture."""

import copy

import pytest
import torch
import torch.nn as nn

from benchmarks.tiny_lm import encode, heldout_text, load, perplexity
from dsx.quant.gptq import Hessian, dequantize, gptq_quantize, gptq_sequential
from dsx.quant.int4 import minmax_params, quantize_groups


def rtn(w, group_size):
    scale, zero = minmax_params(w, group_size)
    return quantize_groups(w, scale, zero, group_size), scale, zero


def correlated_layer(n=64, k=256, rows=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=gen) / k ** 0.5
    x = torch.randn(rows, k, generator=gen) @ a
    x[:, :8] *= 10.0  # a few salient input features
    w = torch.randn(n, k, generator=gen) * 0.05
    hess = Hessian(k)
    for chunk in x.split(512):
        hess.add(chunk.view(4, -1, k))  # leading dims are flattened
    return w, x, hess


def out_error(x, w, wq):
    return float((x @ w.t() - x @ wq.t()).norm())


def test_hessian_matches_definition_and_counts():
    x = torch.randn(3, 10, 16)
    hess = Hessian(16, dtype=torch.float64)
    hess.add(x[:1])
    hess.add(x[1:])
    flat = x.reshape(-1, 16).double()
    assert hess.n == 30
    torch.testing.assert_close(hess.h, 2.0 / 30 * flat.t() @ flat)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_hessian_rejects_non_finite(bad):
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="^calibration: "):
        Hessian(8).add(x)


@pytest.mark.parametrize("kwargs, name", [
    ({"group_size": 48}, "group_size"), ({"damp": 0.0}, "damp"), ({"damp": -1.0}, "damp"),
    ({"weight": torch.randn(64)}, "weight"), ({"hessian": torch.eye(32)}, "hessian"),
    ({"block_size": 0}, "block_size"),
])
def test_gptq_quantize_rejects_bad_args(kwargs, name):
    args = {"weight": torch.randn(16, 64), "hessian": torch.eye(64), "group_size": 32, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}: "):
        gptq_quantize(**args)


def test_indefinite_hessian_raises_calibration_error():
    h = -torch.eye(32)
    with pytest.raises(ValueError, match="^calibration: "):
        gptq_quantize(torch.randn(8, 32), h, group_size=32)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size, block_size", [(64, 128), (32, 48)])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, group_size, block_size):
    w, x, hess = correlated_layer()
    q, scale, zero = gptq_quantize(w, hess, group_size=group_size, act_order=act_order, block_size=block_size)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    assert scale.shape == zero.shape == (64, 256 // group_size) and scale.dtype == zero.dtype == torch.float32
    err = out_error(x, w, dequantize(q, scale, zero))
    base = out_error(x, w, dequantize(*rtn(w, group_size)))
    print(f"act_order={act_order} group_size={group_size}: GPTQ {err:.3f} vs RTN {base:.3f}")
    assert err < 0.8 * base


def test_diagonal_hessian_reduces_to_rtn():
    # uncorrelated inputs: no error to propagate, so GPTQ is round-to-nearest in either column order
    w = torch.randn(32, 128)
    h = torch.diag(torch.rand(128) + 0.1)
    expect = rtn(w, 32)
    for act_order in (False, True):
        for got, ref in zip(gptq_quantize(w, h, group_size=32, act_order=act_order), expect):
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("act_order", [False, True])
def test_block_size_does_not_change_the_result(act_order):
    # the lazy block updates are exact: any block size gives the column-by-column result
    w, _, hess = correlated_layer(n=16, k=128, rows=512)
    ref = gptq_quantize(w, hess, group_size=32, act_order=act_order, block_size=1)
    for block_size in (7, 128, 1000):
        q, scale, zero = gptq_quantize(w, hess, group_size=32, act_order=act_order, block_size=block_size)
        torch.testing.assert_close(scale, ref[1], rtol=1e-4, atol=1e-6)
        assert (q.int() - ref[0].int()).abs().max() <= 1 and (q != ref[0]).float().mean() < 0.01


def test_dead_input_column_is_handled():
    w, x, _ = correlated_layer(k=128)
    x[:, 5] = 0.0
    hess = Hessian(128)
    hess.add(x)
    assert hess.h[5, 5] == 0
    for act_order in (False, True):
        q, scale, zero = gptq_quantize(w, hess, group_size=64, act_order=act_order)
        wq = dequantize(q, scale, zero)
        assert torch.isfinite(wq).all() and wq[:, 5].abs().max() <= scale[:, 0].max()  # the dead column is ~0
        assert out_error(x, w, wq) < out_error(x, w, dequantize(*rtn(w, 64)))


def test_sequential_falls_back_to_the_whole_model_without_module_list():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    unused = nn.Linear(64, 64)
    linears = {"0": model[0], "2": model[2], "unused": unused}
    before = {n: m.weight.clone() for n, m in linears.items()}
    out = gptq_sequential(model, [torch.randn(16, 64) for _ in range(2)], linears, group_size=32, progress=False)
    assert set(out) == {"0", "2"}
    assert all(torch.equal(m.weight, before[n]) for n, m in linears.items())


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return load()


def test_sequential_on_tiny_llama_beats_rtn(llama):
    group_size = 128
    ids = encode(heldout_text())
    calib = ids[16384:16384 + 4 * 4 * 256].view(4, 4, 256)  # 4 batches of 4 x 256 tokens, away from the eval text
    linears = {n: m for n, m in llama.named_modules() if isinstance(m, nn.Linear)}
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    out = gptq_sequential(llama, [{"input_ids": b} for b in calib], linears, group_size=group_size,
                          progress=False)
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    block_names = {n for n in linears if n.startswith("model.layers.")}
    assert block_names <= set(out) and len(block_names) == 7 * llama.config.num_hidden_layers
    assert "lm_head" in out  # calibrated after the blocks
    for name, (q, scale, zero) in out.items():
        n, k = linears[name].weight.shape
        assert q.shape == (n, k) and scale.shape == zero.shape == (n, k // group_size) and int(q.max()) <= 15

    def ppl_with(codes):
        model = copy.deepcopy(llama)
        mods = dict(model.named_modules())
        for name, (q, scale, zero) in codes.items():
            mods[name].weight.data.copy_(dequantize(q, scale, zero))
        return perplexity(model, ids[:8192])

    fp32 = perplexity(llama, ids[:8192])
    rtn_ppl = ppl_with({n: rtn(m.weight.detach(), group_size) for n, m in linears.items() if n in out})
    gptq_ppl = ppl_with(out)
    print(f"tiny llama ppl (8K held-out bytes, g={group_size}): fp32 {fp32:.4f}  RTN {rtn_ppl:.4f}  "
          f"GPTQ {gptq_ppl:.4f}")
    assert gptq_ppl < rtn_ppl
    assert fp32 < gptq_ppl


def test_sequential_act_order_and_rejects_bad_args(llama):
    ids = encode(heldout_text())[20000:20000 + 2 * 256].view(2, 1, 256)
    mlp = {"model.layers.0.mlp.down_proj": llama.model.layers[0].mlp.down_proj}
    out = gptq_sequential(llama, list(ids), mlp, group_size=64, act_order=True, progress=False)
    assert set(out) == set(mlp)
    with pytest.raises(ValueError, match="^damp: "):
        gptq_sequential(llama, list(ids), mlp, damp=0.0, progress=False)
