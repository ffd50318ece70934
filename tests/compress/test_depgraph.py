"""The channel dependency graph: which weight dims are coupled, and which groups it refuses to prune and why."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.compress.depgraph import build_depgraph
from dsx.core.inputs import normalize_inputs
from dsx.models import TinyGPT, TinyResNet


def graph(model, x, **kw):
    return build_depgraph(model.eval(), normalize_inputs(x), **kw)


def by_key(g):
    return {grp.key: grp for grp in g.groups}


def tensors(g, grp):
    """The claimed (tensor, dim) pairs of a group."""
    return {(g.claims[ci].tensor, g.claims[ci].dim) for ci, _ in grp.footprint}


def test_resnet_residual_adds_couple_producers_and_consumers():
    g = graph(TinyResNet(width=8), torch.randn(2, 3, 16, 16))
    groups = by_key(g)
    assert list(groups) == ["stem.0", "layers.0.conv1", "layers.1.conv1", "layers.1.conv2", "layers.2.conv1",
                            "layers.2.conv2", "fc"]
    stream = tensors(g, groups["stem.0"])  # stem and block 0 add into one stream, read by block 1
    assert {("stem.0.weight", 0), ("stem.1.weight", 0), ("stem.1.running_var", 0), ("layers.0.conv2.weight", 0),
            ("layers.0.bn2.bias", 0), ("layers.0.conv1.weight", 1), ("layers.1.conv1.weight", 1),
            ("layers.1.down.0.weight", 1)} <= stream
    assert ("layers.1.conv2.weight", 0) in tensors(g, groups["layers.1.conv2"])
    assert ("layers.1.down.0.weight", 0) in tensors(g, groups["layers.1.conv2"])  # the shortcut joins its block
    assert ("fc.weight", 1) in tensors(g, groups["layers.2.conv2"])
    assert groups["fc"].reason == "it reaches the model output"
    assert all(grp.reason is None for k, grp in groups.items() if k != "fc")


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3))


def test_concat_keeps_each_producer_its_own_group_at_its_offset():
    g = graph(Concat(), torch.randn(2, 3, 8, 8))
    a, b = by_key(g)["a"], by_key(g)["b"]
    assert (a.size, b.size, a.reason, b.reason) == (4, 6, None, None)
    consumer = next(c for c in g.claims if (c.tensor, c.dim) == ("c.weight", 1))
    assert set(consumer.ids[:4]) == set(a.classes) and set(consumer.ids[4:]) == set(b.classes)


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1, self.dw, self.pw2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.pw2(F.relu(self.dw(self.pw1(x)))).mean((2, 3))


def test_depthwise_conv_prunes_with_its_producer():
    g = graph(Depthwise(), torch.randn(2, 3, 8, 8))
    pw1 = by_key(g)["pw1"]
    assert {("dw.weight", 0), ("dw.bias", 0), ("pw2.weight", 1)} <= tensors(g, pw1) and "dw" not in by_key(g)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.b, self.c = nn.Conv2d(16, 8, 3, padding=1, groups=4), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(self.b(self.gn(self.a(x)))).mean((2, 3))


def test_grouped_conv_and_groupnorm_keep_equal_blocks():
    groups = by_key(graph(Grouped(), torch.randn(2, 3, 8, 8)))
    assert groups["a"].nblocks == 4 and groups["b"].nblocks == 4
    assert groups["a"].blocks.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


class Flatten(nn.Module):
    def __init__(self, hard: bool = False):
        super().__init__()
        self.conv, self.fc, self.hard = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6 * 4 * 4, 2), hard

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.fc(y.view(-1, 6 * 4 * 4) if self.hard else y.flatten(1))


def test_flatten_into_linear_is_followed_per_position():
    g = graph(Flatten(), torch.randn(2, 3, 4, 4))
    conv = by_key(g)["conv"]
    assert conv.reason is None and dict((g.claims[ci].tensor, n) for ci, n in conv.footprint)["fc.weight"] == 16


def test_hard_coded_view_of_channels_is_refused():
    assert "fixed size" in by_key(graph(Flatten(hard=True), torch.randn(2, 3, 4, 4)))["conv"].reason


class Probe(nn.Module):
    """A conv, one construct the graph must refuse (or nothing: "plain"), a linear head."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv, self.kind = nn.Conv2d(3, 8, 1), kind
        self.fc, self.fc4 = nn.Linear(8, 2), nn.Linear(4, 2)
        self.register_buffer("scale", torch.ones(1, 8, 1, 1))
        self.norm = nn.LayerNorm([8, 4, 4])

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "slice":
            return self.fc4(y[:, :4].mean((2, 3)))
        if self.kind == "shape":
            b, c, h, w = y.shape
            return self.fc(y.reshape(b, c, h * w).mean(-1))
        if self.kind == "split":
            y = y.unflatten(1, (2, 4))
        elif self.kind == "fixed":
            y = y * self.scale
        elif self.kind == "unknown":
            y = torch.fft.fft2(y).real
        elif self.kind == "reduce":
            y = y.softmax(1)
        elif self.kind == "norm":
            y = self.norm(y)
        elif self.kind == "setitem":
            y = y.clone()
            y[:, 0] = 0
        return self.fc(y.flatten(1, -3).mean((-2, -1)))


@pytest.mark.parametrize("kind,reason", [
    ("shape", "reads its channel count"), ("slice", "selects a part"), ("split", "splits channels"),
    ("fixed", "fixed-size tensor"), ("unknown", "does not follow"), ("reduce", "reduces over the channels"),
    ("norm", "over several dims"), ("setitem", "indexed assignment"),
])
def test_constructs_that_cannot_stay_consistent_pin_the_group(kind, reason):
    grp = by_key(graph(Probe(kind), torch.randn(2, 3, 4, 4)))["conv"]
    assert reason in grp.reason


def test_plain_use_leaves_the_probe_prunable():
    assert by_key(graph(Probe("plain"), torch.randn(2, 3, 4, 4)))["conv"].reason is None


def test_size_reads_of_other_dims_do_not_pin():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8 * 16, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(y.shape[0], -1) + y.reshape(y.size(0), -1))

    assert by_key(graph(M(), torch.randn(2, 3, 4, 4)))["conv"].reason is None


def test_skip_names_and_patterns_pin_their_groups():
    g = graph(TinyResNet(width=8), torch.randn(2, 3, 16, 16), skip=["layers.1", "re:layers\\.2\\.conv1"])
    groups = by_key(g)
    assert groups["layers.1.conv1"].reason == "skipped (skip='layers.1')"
    assert groups["layers.2.conv1"].reason.startswith("skipped")
    assert groups["stem.0"].reason.startswith("skipped")  # layers.1 reads it, and keeps its input channels
    assert groups["layers.0.conv1"].reason is None
    with pytest.warns(UserWarning, match="matches no module"):
        graph(TinyResNet(width=8), torch.randn(2, 3, 16, 16), skip=["nope"])
    with pytest.raises(TypeError, match="skip"):
        graph(TinyResNet(width=8), torch.randn(2, 3, 16, 16), skip="layers.1")


def test_tied_embedding_and_head_share_one_group():
    g = graph(TinyGPT(vocab=50, dim=16, layers=1, heads=2, max_len=8, dropout=0.0), torch.randint(0, 50, (2, 8)))
    groups = by_key(g)
    assert ("tok.weight", 1) in tensors(g, groups["tok"]) and ("pos.weight", 1) in tensors(g, groups["tok"])
    # TinyGPT's attention reads the width (b, t, d = x.shape) and splits q/k/v: those channels stay
    assert "channel count" in groups["tok"].reason and "selects a part" in groups["blocks.0.attn.qkv"].reason
    assert groups["blocks.0.fc"].reason is None
