import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrize import type_before_parametrizations

import dsx
from dsx.compress import Sparsify, make_permanent, prune, sparsify
from dsx.compress import sparsity as sp
from dsx.compress.masks import get_mask, masked_modules
from dsx.compress.sparsity import SemiSparseLinear, check_2to4, mask_2to4


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.odd = nn.Linear(64, 30)
        self.head = nn.Linear(30, 32)

    def forward(self, x):
        return self.head(self.odd(torch.relu(self.down(torch.relu(self.up(x))))))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def x():
    return torch.randn(4, 64)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_check_2to4():
    assert check_2to4(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]]))
    assert not check_2to4(torch.tensor([[0.0, 1.0, 1.0, 2.0]]))
    assert not check_2to4(torch.zeros(2, 6)) and not check_2to4(torch.zeros(8))


def test_mask_keeps_two_largest_per_group():
    w = torch.tensor([[0.1, -4.0, 3.0, 0.2, 1.0, 2.0, -3.0, 4.0]])
    assert mask_2to4(w).tolist() == [[False, True, True, False, False, False, True, True]]


def test_sparsify_pattern_and_skipped_reasons(mlp, x):
    out = sparsify(mlp, example_inputs=x)
    assert not masked_modules(mlp)
    assert check_2to4(out.up.weight) and check_2to4(out.down.weight)
    assert get_mask(out.odd) is None and get_mask(out.head) is None
    entry = dsx.history(out)[-1]
    assert entry["transform"] == "sparsify" and entry["stage"] == "prune"
    assert entry["config"]["layers"] == ["down", "up"]
    info = entry["info"]
    assert info["sparsified"] == 2 and info["sparsity"] == 0.5 and info["accelerated"] == []
    assert info["skipped"]["odd"].startswith("out_features 30 is not a multiple of 32")
    assert info["skipped"]["head"].startswith("in_features 30 is not a multiple of 64")
    assert "sparsify" in str(dsx.summary(out))


def test_fine_tuning_keeps_the_pattern(mlp, x):
    out = sparsify(mlp).train()
    opt = torch.optim.AdamW(out.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        out(x).square().mean().backward()
        opt.step()
    assert check_2to4(out.up.weight) and check_2to4(out.down.weight)
    assert not check_2to4(out.odd.weight)


def test_explicit_layers(mlp):
    assert get_mask(Sparsify(layers=["down"])(mlp).up) is None
    with pytest.raises(ValueError, match="layers: 'odd' cannot take the 2:4 pattern"):
        Sparsify(layers=["odd"])(mlp)


@pytest.mark.parametrize("pattern", ["4:8", "2:5", "1:4"])
def test_unsupported_pattern(pattern):
    with pytest.raises(ValueError, match=r"pattern.*'2:4'"):
        Sparsify(pattern)


def test_then_quantize_keeps_zeros(mlp, x):
    q = dsx.quantize(sparsify(mlp, example_inputs=x), "int8", example_inputs=x)
    assert q.up.weight.dtype == torch.int8 and check_2to4(q.up.weight) and check_2to4(q.down.weight)
    assert [e["transform"] for e in dsx.history(q)] == ["sparsify", "quantize"]
    with pytest.raises(ValueError, match="cannot apply 'sparsify' after 'quantize'"):
        sparsify(q)


def test_prune_then_sparsify_combines_masks(mlp):
    pruned = prune(mlp, 0.6)
    before = get_mask(pruned.up).clone()
    both = sparsify(pruned)
    assert check_2to4(both.up.weight) and not (get_mask(both.up) & ~before).any()
    assert get_mask(both.odd) is not None, "pruned layers ineligible for 2:4 keep their pruning mask"


def test_save_load_bit_exact(mlp, x, tmp_path):
    out = sparsify(mlp, skip=["up"], example_inputs=x)
    dsx.save(out, tmp_path)
    back = dsx.load(MLP(), tmp_path)
    assert state_equal(back, out) and torch.equal(back(x), out(x)) and get_mask(back.up) is None


def test_accelerate_true_needs_a_supported_gpu(mlp):
    with pytest.raises(ValueError, match="accelerate: layer 'up' cannot run the 2:4 sparse kernels"):
        sparsify(mlp, accelerate=True)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Pretend this device runs the 2:4 kernels: the 'compressed' weight is a dense copy, counted."""
    calls = []

    def compress(w):
        calls.append(w.shape)
        return w.clone()

    monkeypatch.setattr(sp, "accelerate_reason", lambda module: None)
    monkeypatch.setattr(sp, "to_sparse_semi_structured", compress)
    return calls


def test_accelerated_layers_cache_and_follow_training(mlp, x, fake_kernels, tmp_path):
    out = sparsify(mlp, accelerate=True, example_inputs=x)
    assert dsx.history(out)[-1]["info"]["accelerated"] == ["up", "down"]
    assert type_before_parametrizations(out.up) is SemiSparseLinear and isinstance(out.up, nn.Linear)
    reference = copy.deepcopy(out)
    n = len(fake_kernels)
    with torch.no_grad():
        first = out(x)
        assert torch.equal(out(x), first)
    assert len(fake_kernels) == n, "the compressed weight is cached while the weight does not change"
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    out(x).sum().backward()
    opt.step()
    assert len(fake_kernels) == n, "training runs the dense path"
    with torch.no_grad():
        assert not torch.equal(out(x), first)
    assert len(fake_kernels) == n + 2 and check_2to4(out.up.weight)
    dsx.save(reference, tmp_path)
    back = dsx.load(MLP(), tmp_path)
    assert type_before_parametrizations(back.up) is SemiSparseLinear and state_equal(back, reference)
    plain = make_permanent(reference)
    with torch.no_grad():
        assert torch.equal(plain(x), first)


def test_accelerated_save_loads_dense_elsewhere(mlp, x, fake_kernels, monkeypatch, tmp_path):
    out = sparsify(mlp, accelerate=True)
    dsx.save(out, tmp_path)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="stays masked dense"):
        back = dsx.load(MLP(), tmp_path)
    assert type_before_parametrizations(back.up) is nn.Linear and state_equal(back, out)


def test_accelerated_inference_in_eval_mode_takes_the_sparse_path_with_any_input_dtype(mlp, x, fake_kernels,
                                                                                       monkeypatch):
    out = sparsify(mlp, accelerate=True).eval()
    with torch.no_grad():
        expected = make_permanent(copy.deepcopy(out)).up(x).double()
    sparse_calls = []
    monkeypatch.setattr(sp, "compressed", lambda m, real=sp.compressed: sparse_calls.append(m) or real(m))
    got = out.up(x.double())  # autograd on, weights trainable: eval mode still runs the compressed weight
    assert got.dtype == torch.float64 and sparse_calls == [out.up]
    assert torch.allclose(got, expected, atol=1e-6)
    out.up(x.requires_grad_()).sum().backward()  # an input gradient needs the dense path
    assert sparse_calls == [out.up] and x.grad is not None
