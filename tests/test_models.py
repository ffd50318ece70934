import torch

from dsx.models import TinyGPT, TinyResNet, randomize_batchnorm


def test_tiny_gpt_is_causal_and_ties_its_head():
    m = TinyGPT(vocab=32, dim=16, layers=1, heads=2, max_len=8).eval()
    assert m.head.weight is m.tok.weight
    x = torch.randint(0, 32, (2, 8))
    y = m(x)
    assert y.shape == (2, 8, 32)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 32
    torch.testing.assert_close(m(x2)[:, :-1], y[:, :-1])


def test_tiny_resnet_shape_and_randomized_batchnorm():
    m = randomize_batchnorm(TinyResNet(classes=5, width=4)).eval()
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    bn = m.stem[1]
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
