import pytest
import torch
import torch.nn as nn

import dsx
from dsx.graph.fuse import Fuse, fusions
from dsx.models import TinyResNet, randomize_batchnorm
from tests.hf_models import tiny_hf


def test_fuse_transform_records_fusions_and_capture_info():
    model, kw = tiny_hf("gpt2")
    out = Fuse()(model, kw)
    entry = out._dsx_history[-1]
    assert entry["transform"] == "fuse" and entry["stage"] == "fuse"
    assert entry["info"]["captured"] == [""] and entry["info"]["eager"] == {}
    assert any("use_cache" in n for n in entry["info"]["notes"])
    assert fusions(out)["attention_to_sdpa"] == 2


def test_fuse_refuses_training_mode():
    with pytest.raises(ValueError, match="training mode"):
        Fuse()(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))


@pytest.mark.parametrize("verify", [True, False])
def test_a_refused_training_model_is_left_byte_identical(verify):
    model = randomize_batchnorm(TinyResNet(width=8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fuse: the model is in training mode"):
        Fuse(verify=verify)(model, torch.randn(2, 3, 16, 16))
    assert model.training and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_capture_of_a_training_model_runs_it_in_eval_mode_and_leaves_it_unchanged():
    model = randomize_batchnorm(TinyResNet(width=8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    captured = dsx.capture(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(captured.module(x), model.eval()(x))


def test_fuse_from_a_recipe_and_back():
    c = dsx.from_recipe({"transforms": [{"fuse": {"passes": ["remove_dropout", "fold_batch_norm"]}}]})
    model = randomize_batchnorm(TinyResNet(width=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    out = c(model, x)
    assert fusions(out) == {"remove_dropout": 0, "fold_batch_norm": 9}
    assert dsx.to_recipe(c) == {"transforms": [{"fuse": {"passes": ["remove_dropout", "fold_batch_norm"],
                                                         "dynamic_batch": False}}]}


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_fused_hf_model_saves_and_reloads_bit_exact(tmp_path, name):
    model, kw = tiny_hf(name)
    fused = dsx.Fuse()(model, kw)
    dsx.save(fused, tmp_path / name)
    fresh, _ = tiny_hf(name)
    torch.manual_seed(123)
    for p in fresh.parameters():
        nn.init.normal_(p)
    again = dsx.load(fresh, tmp_path / name)
    a, b = fused.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(again(**kw).last_hidden_state, fused(**kw).last_hidden_state)
    assert dsx.history(again) == dsx.history(fused)


def test_folded_resnet_state_has_no_stale_batchnorm_tensors():
    model = randomize_batchnorm(TinyResNet(width=8)).eval()
    fused = dsx.Fuse()(model, torch.randn(2, 3, 16, 16))
    keys = set(fused.state_dict())
    assert not [k for k in keys if "running_" in k or "num_batches_tracked" in k]
    assert not keys & {"stem.0.weight", "stem.1.weight", "stem.1.bias", "layers.0.bn1.weight"}
    assert "stem_0_weight_bn_folded" in keys
