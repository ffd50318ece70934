import torch
import torch.nn as nn
import torch.nn.functional as F

from dsx.graph.fx_utils import finish
from dsx.graph.passes.fold_batch_norm import fold_batch_norm
from tests.graph.pass_testing import rel_err

aten = torch.ops.aten
BN_OPS = {aten.batch_norm.default, aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default}


class Net(nn.Module):
    """conv(no bias)-bn-relu, grouped conv-bn + residual, depthwise conv-bn (no affine), linear-BatchNorm1d."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=2), nn.BatchNorm2d(c)
        self.dw, self.bn3 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c, affine=False)
        self.fc, self.bn4 = nn.Linear(c, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        y = F.relu(self.bn3(self.dw(y)))
        return self.bn4(self.fc(y.mean((2, 3))))


def _randomize(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.3)
                if bn.affine:
                    bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                    bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
    return m.eval()


def _bn_nodes(gm):
    return [n for n in gm.graph.nodes if n.target in BN_OPS]


def _check_meta(gm):
    """Every tensor-producing node, including the ones the pass created, carries an example value."""
    for n in gm.graph.nodes:
        if n.op in ("call_function", "get_attr"):
            assert isinstance(n.meta.get("val"), torch.Tensor), n


def test_fold_constants_matches_eager():
    m, x = _randomize(Net()), torch.randn(2, 3, 8, 8)
    gm = torch.export.export(m, (x,), strict=False).module()
    n_params = len(list(gm.parameters()))
    assert fold_batch_norm(gm) == 4
    finish(gm)
    _check_meta(gm)
    assert not _bn_nodes(gm)
    assert not any(n.target in (aten.rsqrt.default, aten.mul.Tensor) for n in gm.graph.nodes)
    assert len(list(gm.parameters())) == n_params + 8
    with torch.no_grad():
        assert rel_err(gm(x), m(x)) < 1e-5


def test_fold_decomposed_convolution_form():
    m = _randomize(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Unflatten(2, (2, 3, 1)),
                                 nn.Conv3d(4, 5, 1), nn.BatchNorm3d(5)))
    x = torch.randn(2, 3, 8)
    gm = torch.export.export(m, (x,), strict=False).run_decompositions().module()
    assert sum(n.target is aten._native_batch_norm_legit_no_training.default for n in gm.graph.nodes) == 2
    assert fold_batch_norm(gm) == 2
    finish(gm)
    assert not _bn_nodes(gm)
    with torch.no_grad():
        assert rel_err(gm(x), m(x)) < 1e-5


class Functional(nn.Module):
    """Takes the parameters and buffers as forward arguments, so export makes them placeholders."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, params, x):
        return torch.func.functional_call(self.inner, params, (x,))


def test_fold_placeholder_weights_as_graph_ops():
    m, x = _randomize(Net()), torch.randn(2, 3, 8, 8)
    params = {**dict(m.named_parameters()), **dict(m.named_buffers())}
    gm = torch.export.export(Functional(m), (params, x), strict=False).module()
    assert all(n.args[3].op == "placeholder" for n in gm.graph.nodes if n.target in BN_OPS)
    assert fold_batch_norm(gm) == 4
    finish(gm)
    _check_meta(gm)
    assert not _bn_nodes(gm)
    assert sum(n.target is aten.rsqrt.default for n in gm.graph.nodes) == 4
    for n in gm.graph.nodes:
        if n.target in (aten.conv2d.default, aten.linear.default):
            assert n.args[1].op == "call_function" and n.args[2].op == "call_function"
    with torch.no_grad():
        assert rel_err(gm(params, x), m(x)) < 1e-5
    # gradients reach the original weights through the folded graph ops
    out = gm(params, x)
    (out ** 2).sum().backward()
    assert m.conv1.weight.grad is not None and m.bn1.weight.grad is not None


def test_not_folded_when_unsafe():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class Linear3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x))

    cases = [(_randomize(Shared()), torch.randn(2, 3, 4, 4)), (_randomize(Linear3d()), torch.randn(2, 4, 8)),
             (_randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).train(), torch.randn(2, 3, 4, 4)),
             (_randomize(nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4))), torch.randn(2, 3, 4, 4))]
    for m, x in cases:
        gm = torch.export.export(m, (x,), strict=False).module()
        before = len(_bn_nodes(gm))
        assert fold_batch_norm(gm) == 0
        assert len(_bn_nodes(gm)) == before == 1
