import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model
from torch.nn.utils import parametrize

import dsx
from dsx.compress import make_permanent
from dsx.compress.masks import apply_mask, count_nonzero, get_mask, masked_modules, remove_mask, source


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def random_mask(shape, p=0.5, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > p


def test_effective_weight_is_weight_times_mask_and_original_zeroed():
    lin = nn.Linear(16, 32)
    w0 = lin.weight.detach().clone()
    mask = random_mask(w0.shape)
    apply_mask(lin, mask)
    assert torch.equal(lin.weight, w0 * mask)
    assert torch.equal(source(lin), w0 * mask)
    assert isinstance(lin, nn.Linear) and torch.equal(get_mask(lin), mask)


def test_masks_hold_through_training():
    model = mlp()
    params = list(model.parameters())
    mask = random_mask(model[0].weight.shape)
    apply_mask(model[0], mask)
    assert source(model[0]) is params[0], "masking keeps the parameter object, so existing optimizers still work"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 16)).pow(2).sum().backward()
        assert (source(model[0]).grad[~mask] == 0).all()
        assert (source(model[0]).grad[mask] != 0).any()
        opt.step()
    assert (model[0].weight[~mask] == 0).all() and (source(model[0])[~mask] == 0).all()
    assert (model[0].weight[mask] != 0).all()


def test_masks_intersect_and_check_shape():
    lin = nn.Linear(16, 32)
    a, b = random_mask(lin.weight.shape, seed=1), random_mask(lin.weight.shape, seed=2)
    apply_mask(lin, a)
    apply_mask(lin, b)
    assert torch.equal(get_mask(lin), a & b)
    assert len(lin.parametrizations.weight) == 1
    with pytest.raises(ValueError, match="shape"):
        apply_mask(lin, torch.ones(3, 3, dtype=torch.bool))


def test_foreign_parametrization_is_refused():
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="already has parametrizations"):
        apply_mask(lin, torch.ones(4, 4, dtype=torch.bool))


def test_deepcopy_is_independent():
    model = mlp()
    apply_mask(model[0], random_mask(model[0].weight.shape))
    clone = copy.deepcopy(model)
    assert torch.equal(clone[0].weight, model[0].weight)
    assert get_mask(clone[0]) is not get_mask(model[0])
    apply_mask(clone[0], torch.zeros_like(get_mask(clone[0])))
    assert model[0].weight.count_nonzero() > 0


def masked_fresh():
    model = mlp()
    apply_mask(model[0], torch.ones(32, 16, dtype=torch.bool))
    return model


def test_state_dict_and_safetensors_round_trip(tmp_path):
    model = mlp()
    apply_mask(model[0], random_mask(model[0].weight.shape))
    x = torch.randn(4, 16)
    fresh = masked_fresh()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x)) and torch.equal(get_mask(fresh[0]), get_mask(model[0]))
    save_model(model, str(tmp_path / "m.safetensors"))
    other = masked_fresh()
    load_model(other, str(tmp_path / "m.safetensors"))
    sd, back = model.state_dict(), other.state_dict()
    assert sd.keys() == back.keys() and all(torch.equal(sd[k], back[k]) for k in sd)


def test_make_permanent_folds_masks_copy_by_default(tmp_path):
    pruned = dsx.compress.prune(mlp(), 0.5)
    x = torch.randn(4, 16)
    plain = make_permanent(pruned)
    assert masked_modules(pruned) and not masked_modules(plain)
    assert type(plain[0]) is nn.Linear and not parametrize.is_parametrized(plain[0])
    assert torch.equal(plain(x), pruned(x))
    assert count_nonzero(plain) == count_nonzero(pruned)
    assert dsx.history(plain)[-1]["transform"] == "make_permanent"
    dsx.save(plain, tmp_path)
    back = dsx.load(mlp(), tmp_path)
    assert set(back.state_dict()) == set(plain.state_dict()) and torch.equal(back(x), plain(x))
    same = make_permanent(pruned, inplace=True)
    assert same is pruned and not masked_modules(pruned)


def test_remove_mask_unfolded_restores_original():
    lin = nn.Linear(4, 4)
    apply_mask(lin, torch.ones(4, 4, dtype=torch.bool))
    remove_mask(lin, fold=False)
    assert type(lin) is nn.Linear
    with pytest.raises(ValueError, match="not masked"):
        remove_mask(lin)
