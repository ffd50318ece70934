"""Structured pruning of CNNs and MLPs: parameter ratio, unchanged output shapes, replay from the plan, round_to,
skip, scope, each importance, and what it refuses."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.compress.structured import block_linear_weights, prune_structured
from dsx.core.inputs import normalize_inputs
from dsx.models import TinyResNet, randomize_batchnorm


def conv_bn(cin, cout, stride=1, groups=1, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(conv_bn(cin, hidden, k=1), conv_bn(hidden, hidden, stride, groups=hidden),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNet(nn.Module):
    """MobileNetV2-style: depthwise-separable inverted residuals, flatten into a linear classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16, 2), InvertedResidual(16, 16, 1, 2),
                                      InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(24 * 4 * 4, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class GroupedNet(nn.Module):
    """Grouped conv, GroupNorm and a concat of two branches."""

    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.b, self.c, self.d = nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.Conv2d(32, 8, 1), nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = self.c(F.relu(self.b(self.gn(self.a(x)))))
        return self.fc(torch.cat([y, self.d(x)], 1).mean((2, 3)))


MODELS = {
    "resnet": lambda: (randomize_batchnorm(TinyResNet(width=16)), torch.randn(2, 3, 16, 16)),
    "mobilenet": lambda: (randomize_batchnorm(MobileNet()), torch.randn(2, 3, 16, 16)),
    "grouped": lambda: (GroupedNet(), torch.randn(2, 3, 8, 8)),
    "mlp": lambda: (nn.Sequential(nn.Linear(12, 64), nn.GELU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 3)),
                    torch.randn(4, 12)),
}


def prune(model, x, amount=0.5, **kw):
    return prune_structured(model.eval(), amount, normalize_inputs(x), **kw)


def assert_replays(original, pruned, info, x):
    """A fresh copy pruned from the plan alone takes the pruned weights strictly and gives the same outputs."""
    fresh, _ = prune(copy.deepcopy(original), x, 0.0, plan=info["plan"])
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))


@pytest.mark.parametrize("amount", [0.5, 0.3])
@pytest.mark.parametrize("name", MODELS)
def test_prunes_to_the_ratio_keeps_output_shapes_and_replays(name, amount):
    model, x = MODELS[name]()
    original = copy.deepcopy(model).eval()
    pruned, info = prune(model, x, amount)
    assert pruned is model
    assert abs(info["ratio"] - amount) <= 0.05, info
    assert info["params_after"] == sum(p.numel() for p in pruned.parameters()) < info["params_before"]
    assert info["pruned"] >= 1 and set(info["plan"]) <= set(info["original"])
    json.dumps(info)
    with torch.no_grad():
        assert pruned(x).shape == original(x).shape
    assert_replays(original, pruned, info, x)


def test_layers_shrink_consistently():
    model, x = MODELS["mobilenet"]()
    pruned, _ = prune(model, x, 0.5)
    block = pruned.features[2].body
    assert block[1][0].groups == block[1][0].in_channels == block[1][0].out_channels == block[0][0].out_channels
    assert block[1][1].num_features == block[1][0].out_channels == block[2].in_channels
    assert pruned.classifier[1].in_features == pruned.features[3].body[2].out_channels * 16
    grouped, y = MODELS["grouped"]()
    pruned, info = prune(grouped, y, 0.5)
    assert pruned.a.out_channels == pruned.gn.num_channels == pruned.b.in_channels and pruned.a.out_channels % 4 == 0
    assert pruned.b.groups == 4 and pruned.fc.in_features == pruned.c.out_channels + pruned.d.out_channels


def test_round_to_keeps_widths_multiples():
    model, x = randomize_batchnorm(TinyResNet(width=32)), torch.randn(2, 3, 16, 16)
    pruned, info = prune(model, x, 0.4, round_to=8)
    assert abs(info["ratio"] - 0.4) <= 0.05
    assert all(k % 8 == 0 and k >= 8 for k in info["plan"].values())
    assert all(m.out_channels % 8 == 0 for m in pruned.modules() if isinstance(m, nn.Conv2d))


def test_round_to_larger_than_a_group_leaves_it():
    model, x = MODELS["mlp"]()
    _, info = prune(model, x, 0.5, round_to=64)
    assert info["plan"] == {} and set(info["skipped"]) == {"0", "2", "4"}
    assert "round_to=64" in info["skipped"]["0"]


def test_skip_keeps_named_layers_whole():
    model, x = randomize_batchnorm(TinyResNet(width=16)), torch.randn(2, 3, 16, 16)
    pruned, info = prune(model, x, 0.3, skip=["layers.2"])
    assert pruned.layers[2].conv1.weight.shape == (64, 32, 3, 3) and pruned.layers[2].conv2.out_channels == 64
    assert info["skipped"]["layers.2.conv1"].startswith("skipped") and "layers.2.conv1" not in info["plan"]
    assert pruned.layers[0].conv1.out_channels < 16


def test_global_scope_prunes_the_least_important_groups_more():
    def build():
        model = randomize_batchnorm(TinyResNet(width=16))
        with torch.no_grad():
            model.layers[1].conv1.weight.mul_(1e-3)  # a whole group of weak channels
        return model, torch.randn(2, 3, 16, 16)

    _, local = prune(*build(), 0.3, scope="local")
    _, glob = prune(*build(), 0.3, scope="global")
    assert abs(local["ratio"] - 0.3) <= 0.05 and abs(glob["ratio"] - 0.3) <= 0.05
    assert glob["plan"]["layers.1.conv1"] < local["plan"]["layers.1.conv1"]
    fractions = [local["plan"][k] / local["original"][k] for k in local["plan"]]
    assert max(fractions) - min(fractions) < 0.35


class TwoLayer(nn.Module):
    """conv a (8 channels) -> BN -> conv b -> pooled: channels 0, 2, 4, 6 are dead in the weights (or the BN)."""

    def __init__(self, dead_in: str):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            dead = [0, 2, 4, 6]
            if dead_in == "weights":
                self.a.weight[dead] = 0
                self.a.bias[dead] = 0
                self.b.weight[:, dead] = 0
            else:
                self.bn.weight[dead] = 0
                self.bn.weight[[1, 3, 5, 7]] = 1
                self.a.weight[dead] *= 50

    def forward(self, x):
        return self.b(F.relu(self.bn(self.a(x)))).mean((2, 3))


@pytest.mark.parametrize("importance,dead_in", [("l1", "weights"), ("l2", "weights"), ("taylor", "weights"),
                                                ("bn_scale", "bn")])
def test_each_importance_removes_the_dead_channels(importance, dead_in):
    x = torch.randn(4, 3, 6, 6)
    model = TwoLayer(dead_in)
    calibration = [torch.randn(4, 3, 6, 6) for _ in range(2)] if importance == "taylor" else None
    pruned, info = prune(model, x, 0.5, importance=importance, calibration=calibration)
    assert info["plan"] == {"a": 4}
    kept = pruned.bn.weight if dead_in == "bn" else pruned.a.weight.flatten(1)
    assert bool((kept.abs().reshape(4, -1).sum(1) > 0).all())


def test_taylor_defaults_to_the_example_inputs_and_bn_scale_falls_back_to_l1():
    model, x = MODELS["mlp"]()
    _, taylor = prune(copy.deepcopy(model), x, 0.5, importance="taylor")
    assert abs(taylor["ratio"] - 0.5) <= 0.05
    a, _ = prune(copy.deepcopy(model), x, 0.5, importance="bn_scale")
    b, _ = prune(copy.deepcopy(model), x, 0.5, importance="l1")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).view(-1, 8 * 4 * 4))


def test_a_view_with_a_fixed_channel_size_is_left_unpruned_with_the_reason():
    model, x = HardCodedView(), torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="short of amount"):
        pruned, info = prune(model, x, 0.5)
    assert "fixed size" in info["skipped"]["conv"] and info["plan"] == {} and info["ratio"] == 0
    assert pruned(x).shape == (2, 2)


class FixedPermutation(nn.Module):
    """Shuffles channels with a stored index: the graph follows it, but pruning breaks the stored index."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)
        self.register_buffer("perm", torch.arange(8).flip(0))

    def forward(self, x):
        return self.fc(self.conv(x)[:, self.perm].mean((2, 3)))


def test_a_model_that_breaks_after_pruning_gets_a_clear_error():
    with pytest.raises(ValueError, match="left a model that fails.*skip="):
        prune(FixedPermutation(), torch.randn(2, 3, 4, 4), 0.5)


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, True, "0.5"])
def test_amount_out_of_range(amount):
    with pytest.raises(ValueError, match="amount"):
        prune(*MODELS["mlp"](), amount)


def test_bad_arguments_name_themselves():
    model, x = MODELS["mlp"]()
    with pytest.raises(ValueError, match="structured pruning needs example_inputs"):
        prune_structured(model, 0.5, None)
    with pytest.raises(ValueError, match=r"importance: expected one of \('l1', 'l2', 'taylor', 'bn_scale'\)"):
        prune(model, x, importance="magnitude")
    with pytest.raises(ValueError, match=r"scope: expected one of \('local', 'global'\)"):
        prune(model, x, scope="layer")
    with pytest.raises(ValueError, match="round_to"):
        prune(model, x, round_to=0)


def test_bad_plans_are_refused():
    model, x = MODELS["grouped"]()
    with pytest.raises(ValueError, match="no group 'nope'"):
        prune(copy.deepcopy(model), x, plan={"nope": 3})
    with pytest.raises(ValueError, match=r"'a' must keep .* divisible by 4"):
        prune(copy.deepcopy(model), x, plan={"a": 6})
    with pytest.raises(ValueError, match="'c' must keep"):
        prune(copy.deepcopy(model), x, plan={"c": 0})
    with pytest.raises(ValueError, match="'fc' cannot be pruned here: it reaches the model output"):
        prune(copy.deepcopy(model), x, plan={"fc": 3})


@pytest.mark.timeout(120)
def test_taylor_on_an_endless_calibration_iterator_stops_and_warns():
    import itertools

    from dsx.core.inputs import MAX_BATCHES

    model, x = MODELS["mlp"]()
    with pytest.warns(UserWarning, match=f"calibration: read the first {MAX_BATCHES} batches and stopped"):
        prune(copy.deepcopy(model), x, 0.5, importance="taylor", calibration=itertools.repeat(x))


class Blocks(nn.Module):
    """Linear layers inside an nn.ModuleList (the blocks) between an embedding and a head outside them."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 10)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)) for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_block_linear_weights_are_the_linears_inside_the_blocks():
    weights = block_linear_weights(Blocks())
    assert weights == {f"blocks.{i}.{j}.weight": 256 for i in (0, 1) for j in (0, 2)}
    assert set(block_linear_weights(Blocks(), skip=["blocks.1"])) == {"blocks.0.0.weight", "blocks.0.2.weight"}
    assert block_linear_weights(MODELS["mlp"]()[0]) == {}  # no blocks


def test_the_report_gives_the_share_of_block_linear_weights_removed():
    ids = torch.randint(0, 10, (2, 5))
    pruned, info = prune(Blocks(), ids, 0.5)
    kept = sum(block_linear_weights(pruned).values())
    assert kept < 1024 and info["linear_ratio"] == round(1 - kept / 1024, 4)
    _, info = prune(MODELS["mlp"]()[0], torch.randn(4, 12), 0.5)
    assert info["linear_ratio"] is None
