"""Tests for dsx.core.compose: validation up front, one copy, same result as applying the transforms in turn."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from dsx.core.compose import Compose, compose
from dsx.core.transform import Transform, VerificationError, history

SEEN: list[int] = []


@dataclass
class Scale(Transform):
    name = "tc_scale"
    stage = "compress"
    factor: float = 1.0

    def apply(self, model, inputs):
        SEEN.append(id(model))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(self.factor)
        return model, {"scaled": self.factor}


@dataclass
class Early(Transform):
    name = "tc_prune"
    stage = "prune"

    def apply(self, model, inputs):
        SEEN.append(id(model))
        return model, {}


@dataclass
class Late(Transform):
    name = "tc_fuse"
    stage = "fuse"
    needs_inputs = True

    def apply(self, model, inputs):
        SEEN.append(id(model))
        return model, {}


@pytest.fixture(autouse=True)
def _clear_seen():
    SEEN.clear()


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_matches_sequential_application_and_copies_once():
    model, x = net(), torch.randn(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = (Early(), Scale(factor=1.0 + 1e-6), Late())
    out = compose(*steps)(model, x)
    assert len(set(SEEN)) == 1 and SEEN[0] != id(model) and SEEN[0] == id(out)
    ref = model
    for t in steps:
        ref = t(ref, x)
    for k, v in ref.state_dict().items():
        assert torch.equal(out.state_dict()[k], v)
    assert [e["transform"] for e in history(out)] == ["tc_prune", "tc_scale", "tc_fuse"]
    assert history(out)[1]["error"]["max_rel"] == pytest.approx(history(ref)[1]["error"]["max_rel"])
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), "the caller's model was modified"
    assert not history(model)


def test_inplace_applies_to_the_model_itself():
    model = net()
    w = model[0].weight.detach().clone()
    out = compose(Scale(factor=2.0), inplace=True)(model)
    assert out is model and SEEN == [id(model)]
    assert torch.equal(model[0].weight, 2 * w)


def test_rejects_non_transforms_by_position():
    with pytest.raises(TypeError, match="item 1"):
        compose(Scale(), "fuse")
    with pytest.raises(TypeError, match="item 0"):
        compose(nn.Linear(2, 2))


def test_rejects_bad_stage_order_up_front():
    with pytest.raises(ValueError, match="prune -> distill -> compress -> fuse -> export"):
        compose(Late(), Early())
    with pytest.raises(ValueError, match="'tc_prune'"):
        compose(Scale(), Early())


def test_empty_compose_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        compose()


def test_refuses_before_running_when_history_conflicts():
    fused = Late()(net(), torch.randn(2, 4))
    SEEN.clear()
    with pytest.raises(ValueError, match="order"):
        compose(Early(), Scale())(fused)
    assert SEEN == []


def test_checks_inputs_before_running_anything():
    with pytest.raises(ValueError, match="tc_fuse"):
        compose(Scale(), Late())(net())
    with pytest.raises(TypeError, match="example_inputs"):
        compose(Scale())(net(), "not inputs")
    with pytest.raises(TypeError, match="nn.Module"):
        compose(Scale())(object())
    assert SEEN == []


def test_verification_failure_leaves_the_caller_model_untouched():
    model, x = net(), torch.randn(3, 4)
    w = model[0].weight.detach().clone()
    with pytest.raises(VerificationError):
        compose(Early(), Scale(factor=3.0))(model, x)
    assert torch.equal(model[0].weight, w) and not history(model)


def test_compose_is_a_value():
    c = compose(Scale(factor=2.0), Late())
    assert isinstance(c, Compose) and isinstance(c.transforms, tuple)
    assert c == Compose([Scale(factor=2.0), Late()])
    with pytest.raises(AttributeError):
        c.inplace = True
