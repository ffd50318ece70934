"""Tests for the Transform base and example inputs: copy vs inplace, verification, order, history, bad input."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from dsx.core.inputs import describe, model_device, normalize_inputs, synthesize
from dsx.core.transform import Transform, VerificationError, compare_outputs, history


@dataclass
class Scale(Transform):
    name = "tt_scale"
    stage = "compress"
    factor: float = 1.0

    def apply(self, model, inputs):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(self.factor)
        return model, {"scaled": len(list(model.parameters()))}


@dataclass
class Late(Transform):
    name = "tt_fuse"
    stage = "fuse"
    needs_inputs = True

    def apply(self, model, inputs):
        assert inputs is not None
        return model, {}


@dataclass
class Wrap(Transform):
    """Returns a new module, as graph transforms do."""

    name = "tt_wrap"
    stage = "prune"

    def apply(self, model, inputs):
        return nn.Sequential(model), {}


class TwoIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, y=None, scale: float = 1.0):
        out = self.lin(x) * scale
        return out if y is None else (out, out + y)


def test_copies_unless_inplace():
    model = nn.Linear(4, 3)
    w = model.weight.detach().clone()
    out = Scale(factor=2.0)(model)
    assert out is not model and torch.equal(model.weight, w) and torch.equal(out.weight, 2 * w)
    assert not history(model)
    same = Scale(factor=2.0, inplace=True)(model)
    assert same is model and torch.equal(model.weight, 2 * w)


def test_history_and_origin_are_recorded_and_json_able():
    x = torch.randn(2, 4)
    model = Late()(Scale(factor=1.0 + 1e-7)(Wrap()(TwoIn()), x), x)
    entries = history(model)
    assert [e["transform"] for e in entries] == ["tt_wrap", "tt_scale", "tt_fuse"]
    assert entries[1]["config"] == {"factor": 1.0 + 1e-7} and entries[1]["info"] == {"scaled": 2}
    assert entries[0]["inputs"] is None and "error" not in entries[0]
    assert entries[1]["error"]["tolerance"] == 1e-4 and entries[1]["error"]["max_rel"] < 1e-6
    assert model._dsx_origin == f"{TwoIn.__module__}.TwoIn" and isinstance(model, nn.Sequential)
    assert json.loads(json.dumps(entries)) == entries


def test_verification_error_past_tolerance():
    x = torch.randn(5, 4)
    model = nn.Linear(4, 3)
    with pytest.raises(VerificationError, match="tt_scale.*over the tolerance 0.0001"):
        Scale(factor=1.01)(model, x)
    assert history(Scale(factor=1.01, verify=False)(model, x))[0].get("error") is None
    bf16 = nn.Linear(4, 3).to(torch.bfloat16)
    Scale(factor=1.01)(bf16, x.to(torch.bfloat16))


def test_order_refusal():
    x = torch.randn(2, 4)
    fused = Late()(nn.Linear(4, 3), x)
    with pytest.raises(ValueError, match="cannot apply 'tt_scale' after 'tt_fuse'.*prune -> distill"):
        Scale()(fused)
    Late()(fused, x)


def test_bad_model_and_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        Scale()(lambda x: x)
    for bad in ("text", 3, {1: torch.ones(1)}, (1, 2), {}):
        with pytest.raises(TypeError, match="example_inputs"):
            Scale()(nn.Linear(4, 3), bad)
    with pytest.raises(ValueError, match="example_inputs are required"):
        Late()(nn.Linear(4, 3))


def test_model_raising_on_inputs_is_a_value_error():
    with pytest.raises(ValueError, match=r"raised RuntimeError.*\(2, 5\)"):
        Scale()(nn.Linear(4, 3), torch.randn(2, 5))


def test_inputs_forms_and_kwargs():
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    assert normalize_inputs(x)[0][0] is x
    assert normalize_inputs([x, y])[0] == (x, y)
    assert normalize_inputs({"x": x})[1] == {"x": x}
    out = Scale(factor=1.0)(TwoIn(), {"x": x, "y": y, "scale": 2.0})
    assert history(out)[0]["error"]["max_rel"] == 0.0


def test_describe_synthesize_round_trip():
    inputs = normalize_inputs((torch.randn(2, 4), {"mask": torch.ones(3, dtype=torch.bool)}, 2.5, None))
    desc = describe(inputs)
    assert json.loads(json.dumps(desc)) == desc
    args, kwargs = synthesize(desc)
    assert kwargs == {} and args[2:] == (2.5, None)
    assert args[0].shape == (2, 4) and args[0].dtype == torch.float32 and args[0].std() > 0
    assert args[1]["mask"].dtype == torch.bool and args[1]["mask"].shape == (3,)
    with pytest.raises(TypeError, match="cannot record"):
        describe(normalize_inputs((torch.ones(1), object())))


def test_from_config_and_registry():
    t = Transform.from_config("tt_scale", {"factor": 3.0})
    assert t == Scale(factor=3.0) and t.config() == {"factor": 3.0}
    with pytest.raises(ValueError, match="unknown transform 'nope'.*tt_scale"):
        Transform.from_config("nope")
    with pytest.raises(ValueError, match="stage"):
        type("Bad", (Transform,), {"name": "tt_bad", "stage": "later", "apply": lambda s, m, i: (m, {})})


def test_compare_outputs_and_model_device():
    with pytest.raises(VerificationError, match="structure"):
        compare_outputs((torch.ones(2),), (torch.ones(2), torch.ones(2)))
    with pytest.raises(VerificationError, match="shape"):
        compare_outputs(torch.ones(2), torch.ones(3))
    with pytest.raises(VerificationError, match="non-finite"):
        compare_outputs(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 2.0]))
    err = compare_outputs(torch.tensor([2.0, -4.0]), torch.tensor([2.0, -3.0]))
    assert err["max_abs"] == 1.0 and err["max_rel"] == 0.25
    assert err["cosine_error"] == pytest.approx(1 - (4 + 12) / (20 ** 0.5 * 13 ** 0.5))
    rows = compare_outputs(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert rows["cosine_error"] == pytest.approx(1 - 2 ** -0.5)
    assert compare_outputs(torch.zeros(2, 3), torch.zeros(2, 3))["cosine_error"] == 0.0
    with pytest.raises(VerificationError, match="nothing to compare"):
        compare_outputs(torch.full((2,), float("nan")), torch.full((2,), float("nan")))
    with pytest.raises(VerificationError, match="nothing to compare"):
        compare_outputs(torch.ones(0, 4), torch.ones(0, 4))
    assert model_device(nn.ReLU()) == torch.device("cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_and_weights_are_refused_up_front(bad):
    model = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"example_inputs: input args\[0\] contains NaN or inf \(1 of 8 values\)"):
        Scale(2.0)(model, x)
    with pytest.raises(ValueError, match=r"example_inputs: input kwargs\['y'\] contains NaN or inf"):
        Scale(2.0)(TwoIn(), {"x": torch.randn(2, 4), "y": torch.full((2, 3), bad)})
    with torch.no_grad():
        model.weight[0, 0] = bad
    with pytest.raises(ValueError, match="model: parameter 'weight' contains NaN or inf"):
        Scale(2.0)(model, torch.randn(2, 4))
    assert torch.equal(model.bias, before["bias"])


def test_a_model_whose_outputs_are_all_nan_or_empty_fails_verification():
    class NaNOut(nn.Module):
        def forward(self, x):
            return x * float("nan")

    with pytest.raises(VerificationError, match="nothing to compare"):
        Scale(1.0)(NaNOut(), torch.randn(2, 4))
    with pytest.raises(VerificationError, match="nothing to compare"):
        Scale(1.0)(nn.Linear(4, 3), torch.randn(0, 4))


@pytest.mark.parametrize("flag", ["inplace", "verify"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_booleans_and_a_refusal_leaves_the_model_alone(flag, value):
    model = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=f"{flag}: expected True or False, got {value!r}"):
        Scale(2.0, **{flag: value})(model, torch.randn(2, 4))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class RecordsPrecision(nn.Linear):
    """Records the TF32 flags in force at each forward."""

    seen: list = []

    def forward(self, x):
        RecordsPrecision.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return super().forward(x)


def test_verification_runs_without_tf32_and_restores_the_settings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        RecordsPrecision.seen = []
        Scale(1.0)(RecordsPrecision(4, 4), torch.randn(2, 4))
        assert RecordsPrecision.seen == [(False, False)] * 2  # the reference and the result
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
