import pytest
import torch
import torch.nn as nn

from dsx.compress.masks import apply_mask, get_mask, source
from dsx.compress.unstructured import is_prunable, lowest_k_masks, magnitude_prune, select_layers


class Conv1D(nn.Module):
    """Stand-in for Hugging Face's GPT-2 Conv1D: weight stored [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.proj = Conv1D(16, 8)
        self.head = nn.Linear(16, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.norm(self.head(self.proj(h)))


def zeros(module):
    return int((module.weight == 0).sum())


def test_lowest_k_masks_are_exact_with_ties():
    a = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0])
    b = torch.tensor([[1.0, 1.0], [3.0, 0.5]])
    for k in range(0, 10):
        ka, kb = lowest_k_masks([a, b], k)
        assert int((~ka).sum() + (~kb).sum()) == k
        kept = torch.cat([a[ka], b[kb]])
        dropped = torch.cat([a[~ka], b[~kb]])
        if k and kept.numel():
            assert dropped.max() <= kept.min()


def test_prunable_layers():
    net = Net()
    assert [n for n, m in net.named_modules() if is_prunable(m)] == ["conv", "proj", "head"]
    apply_mask(net.proj, torch.ones_like(net.proj.weight, dtype=torch.bool))
    assert is_prunable(net.proj), "a masked HF Conv1D is still prunable"


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_local_exact_sparsity_per_layer(amount):
    net = Net()
    chosen, _ = select_layers(net, is_prunable, (), None, "prune")
    before = {n: m.weight.detach().abs() for n, m in chosen.items()}
    magnitude_prune(chosen, amount, "local")
    for n, m in chosen.items():
        assert zeros(m) == round(amount * m.weight.numel())
        if amount:
            assert before[n][~get_mask(m)].max() <= before[n][get_mask(m)].min()
    assert net.norm.weight.count_nonzero() == net.norm.weight.numel()


def test_global_one_threshold():
    net = Net()
    with torch.no_grad():
        net.head.weight.mul_(100)
    before = {n: m.weight.detach().clone() for n, m in [("conv", net.conv), ("proj", net.proj), ("head", net.head)]}
    chosen, _ = select_layers(net, is_prunable, (), None, "prune")
    magnitude_prune(chosen, 0.6, "global")
    total = sum(w.numel() for w in before.values())
    assert sum(zeros(m) for m in chosen.values()) == round(0.6 * total)
    pruned = torch.cat([before[n][~get_mask(m)].abs() for n, m in chosen.items()])
    kept = torch.cat([before[n][get_mask(m)].abs() for n, m in chosen.items()])
    assert pruned.max() <= kept.min()
    assert zeros(net.head) < 0.6 * net.head.weight.numel(), "large-magnitude layer keeps more under global"


def test_pruned_weights_stay_pruned_when_raised():
    net = Net()
    chosen, _ = select_layers(net, is_prunable, (), None, "prune")
    magnitude_prune(chosen, 0.3, "local")
    first = {n: get_mask(m).clone() for n, m in chosen.items()}
    with torch.no_grad():
        source(net.head).add_(5.0)
    magnitude_prune(chosen, 0.6, "local")
    for n, m in chosen.items():
        assert not (get_mask(m) & ~first[n]).any()
        assert zeros(m) == round(0.6 * m.weight.numel())


def test_skip_names_regex_warning_and_tied_weights():
    net = Net()
    net.extra = nn.Linear(16, 5)
    net.extra.weight = net.head.weight
    with pytest.warns(UserWarning, match="'nope' matches no module"):
        chosen, skipped = select_layers(net, is_prunable, ["conv", "re:pr.*", "nope"], None, "prune")
    assert chosen == {}
    assert skipped["conv"] == skipped["proj"] == "skip"
    assert "shared" in skipped["head"] and "shared" in skipped["extra"]


def test_explicit_layers_must_exist():
    with pytest.raises(ValueError, match="layers"):
        select_layers(Net(), is_prunable, (), ["missing"], "prune")
