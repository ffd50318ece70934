import pytest
import torch
import torch.nn as nn

import dsx
from dsx.quant.linear import Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear
from dsx.quant.qat import QATLinear, fake_quantize

datasets = pytest.importorskip("sklearn.datasets")


def test_fake_quantize_rounds_forward_and_passes_gradients_straight_through():
    x = torch.tensor([0.26, -1.0, 3.0, 0.5], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    y = fake_quantize(x, scale)
    assert torch.equal(y.detach(), torch.tensor([0.5, -1.0, 3.0, 0.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
    assert scale.grad is not None and scale.grad.item() != 0.0


@pytest.mark.parametrize("fmt, target", [("int8", Int8Linear), ("int8_static", Int8StaticLinear),
                                         ("int8_weight_only", Int8WeightOnlyLinear)])
def test_convert_matches_the_fake_quantized_model(fmt, target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(16, 32)
    qat = dsx.quantize(model, fmt, qat=True, calibration=[x] if fmt == "int8_static" else None, progress=False)
    assert isinstance(qat[0], QATLinear) and qat[0].weight.requires_grad
    real = dsx.convert(qat, x)
    assert isinstance(real[0], target) and isinstance(real[2], target)
    with torch.no_grad():
        err = (real(x) - qat(x)).abs().max() / qat(x).abs().max()
    assert err < 1e-2
    assert [e["transform"] for e in dsx.history(real)] == ["quantize", "convert"]


def test_convert_without_qat_modules_is_an_error():
    with pytest.raises(ValueError, match="no QAT modules"):
        dsx.convert(nn.Sequential(nn.Linear(4, 4)))


def digits():
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def train(model, x, y, epochs, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_qat_on_digits_ends_within_one_point_of_float(tmp_path):
    (xtr, ytr), (xte, yte) = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    model = train(model, xtr, ytr, epochs=15, lr=3e-3)
    float_acc = accuracy(model, xte, yte)
    assert float_acc > 0.95

    qat = dsx.quantize(model, "int8", qat=True, example_inputs=xte[:32], progress=False)
    qat = train(qat, xtr, ytr, epochs=3, lr=5e-4)
    real = dsx.convert(qat, xte[:32])
    assert all(isinstance(real[i], Int8Linear) for i in (0, 2, 4))
    assert accuracy(real, xte, yte) >= float_acc - 0.01

    dsx.save(real, tmp_path / "qat")
    fresh = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    again = dsx.load(fresh, tmp_path / "qat")
    assert torch.equal(again(xte), real(xte))


@pytest.mark.parametrize("how", ["prune", "sparsify"])
def test_qat_keeps_pruning_masks_through_training_and_convert(how, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    model = dsx.prune(model, 0.5) if how == "prune" else dsx.sparsify(model, "2:4")
    zeros = model[0].weight == 0
    qat = dsx.quantize(model.train(), "int8", qat=True)
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        qat(torch.randn(16, 64)).pow(2).mean().backward()
        opt.step()
    assert (qat[0].weight[zeros] == 0).all()
    real = dsx.convert(qat.eval())
    assert (real[0].weight[zeros] == 0).all()
    dsx.save(qat, tmp_path / "qat")
    fresh = dsx.load(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), tmp_path / "qat")
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in fresh.state_dict().items())
