import pytest
import torch
import torch.nn as nn

from dsx.graph.capture import capture
from tests.hf_models import tiny_hf


class DataDependent(nn.Module):
    """The top-level forward has a data-dependent branch; its children are plain layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        if y.sum().item() > 1e9:
            y = y * 2
        return self.b(y)


class Unexportable(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.ok, self.bad = nn.Linear(4, 4), Unexportable()

    def forward(self, x):
        return self.bad(self.ok(x))


def test_whole_model_is_one_graph():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    c = capture(m, x)
    assert isinstance(c.module, torch.fx.GraphModule) and list(c.graphs) == [""] and not c.eager
    torch.testing.assert_close(c.module(x), m(x))


def test_fallback_captures_children_and_names_the_eager_parts():
    m, x = DataDependent().eval(), torch.randn(2, 8)
    c = capture(m, x)
    assert sorted(c.graphs) == ["a", "b"]
    assert "" in c.eager and "GuardOnDataDependent" in c.eager[""]
    assert all(isinstance(c.module.get_submodule(n), torch.fx.GraphModule) for n in c.graphs)
    torch.testing.assert_close(c.module(x), m(x))
    assert isinstance(m.a, nn.Linear), "the caller's model must not be modified"


def test_uncapturable_leaf_stays_eager():
    m, x = Mixed().eval(), torch.randn(2, 4)
    c = capture(m, x)
    assert list(c.graphs) == ["ok"] and "bad" in c.eager
    torch.testing.assert_close(c.module(x), m(x))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_hugging_face_models_capture_whole(name):
    m, kw = tiny_hf(name)
    c = capture(m, kw)
    assert list(c.graphs) == [""], c.eager
    torch.testing.assert_close(c.module(**kw).last_hidden_state, m(**kw).last_hidden_state)


def test_bad_inputs():
    m = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="model"):
        capture("not a module", torch.randn(1, 4))
    with pytest.raises(TypeError, match="example_inputs"):
        capture(m, 3.0)
    with pytest.raises(ValueError, match="example_inputs"):
        capture(m, torch.randn(2, 5))


def test_a_static_capture_called_with_other_shapes_says_which_it_serves():
    import dsx

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    fused = dsx.Fuse()(model, torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"inputs: this captured graph serves the example inputs' shapes \[\(2, 8\)\] "
                                         r"only .*dynamic_batch=True"):
        fused(torch.randn(5, 8))
    assert fused(torch.randn(2, 8)).shape == (2, 4)
