import math

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.compress import Prune, prune
from dsx.compress.masks import count_nonzero, get_mask, masked_modules
from dsx.models import TinyResNet


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return TinyResNet(width=8).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 16, 16)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prune_copies_records_and_verifies(resnet, x):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    out = prune(resnet, 0.5, example_inputs=x)
    assert not masked_modules(resnet) and all(torch.equal(v, resnet.state_dict()[k]) for k, v in before.items())
    entry = dsx.history(out)[-1]
    assert entry["transform"] == "prune" and entry["stage"] == "prune"
    assert entry["error"]["tolerance"] is None and math.isfinite(entry["error"]["max_rel"])
    info = entry["info"]
    convs = [n for n, m in resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(entry["config"]["layers"]) == sorted(convs) and "skip" not in entry["config"]
    assert info["pruned"] == len(convs) and set(info["layer_sparsity"].values()) == {0.5}
    assert info["nonzeros_after"] < info["nonzeros_before"] <= info["params_before"] == info["params_after"]
    assert (info["params_after"], info["nonzeros_after"]) == count_nonzero(out)
    assert "prune" in str(dsx.summary(out)) and dsx.summary(out).to_dict()["rows"][0]["info"]["pruned"]


def test_inplace_mutates(resnet):
    assert prune(resnet, 0.3, inplace=True) is resnet and masked_modules(resnet)


def test_global_scope_and_skip(resnet):
    out = prune(resnet, 0.7, scope="global", skip=["fc", "re:.*down.*"])
    info = dsx.history(out)[-1]["info"]
    assert info["skipped"] == {"fc": "skip", "layers.1.down.0": "skip", "layers.2.down.0": "skip"}
    masks = [get_mask(m) for m in masked_modules(out).values()]
    pruned = sum(int((~m).sum()) for m in masks)
    assert pruned == round(0.7 * sum(m.numel() for m in masks))
    with pytest.warns(UserWarning, match="matches no module"):
        prune(resnet, 0.3, skip=["nothing"])


def test_max_error_bounds_the_change(resnet, x):
    with pytest.raises(dsx.VerificationError, match="prune"):
        prune(resnet, 0.9, example_inputs=x, max_error=1e-6)
    out = prune(resnet, 0.0, example_inputs=x, max_error=1e-6)
    assert dsx.history(out)[-1]["error"]["max_rel"] == 0.0


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, True, "0.5"])
def test_bad_amount(amount):
    with pytest.raises(ValueError, match="amount"):
        Prune(amount)


def test_bad_settings(resnet):
    with pytest.raises(ValueError, match="structured pruning needs example_inputs"):
        prune(resnet, 0.5, structured=True)
    with pytest.raises(ValueError, match=r"importance.*'l1', 'l2'"):
        Prune(0.5, importance="taylor")
    with pytest.raises(ValueError, match=r"scope.*'local', 'global'"):
        Prune(0.5, scope="layer")
    with pytest.raises(ValueError, match="round_to"):
        Prune(0.5, round_to=8)
    with pytest.raises(TypeError, match="skip"):
        Prune(0.5, skip="fc")
    with pytest.raises(ValueError, match="max_error"):
        Prune(0.5, max_error=0)


def test_save_load_bit_exact(resnet, x, tmp_path):
    out = prune(resnet, 0.6, scope="global", example_inputs=x)
    dsx.save(out, tmp_path)
    back = dsx.load(TinyResNet(width=8), tmp_path)
    assert state_equal(back, out) and torch.equal(back.eval()(x), out(x))
    assert dsx.history(back) == dsx.history(out)


def test_recipe_round_trip_and_order(resnet, x):
    chain = dsx.from_recipe([{"prune": {"amount": 0.5, "skip": ["fc"]}}, "quantize"])
    out = chain(resnet, x)
    assert [e["transform"] for e in dsx.history(out)] == ["prune", "quantize"]
    assert dsx.to_recipe(chain)["transforms"][0]["prune"]["skip"] == ["fc"]
    with pytest.raises(ValueError, match="cannot apply 'prune' after 'quantize'"):
        prune(out, 0.5)


def test_structured_delegates_and_replays(resnet, x, tmp_path):
    out = prune(resnet, 0.5, structured=True, example_inputs=x)
    entry = dsx.history(out)[-1]
    assert entry["config"]["plan"] is not None and "plan" not in entry["info"]
    assert entry["info"]["params_after"] < entry["info"]["params_before"]
    assert out(x).shape == resnet(x).shape
    dsx.save(out, tmp_path)
    back = dsx.load(TinyResNet(width=8), tmp_path)
    assert state_equal(back, out) and torch.equal(back.eval()(x), out(x))
