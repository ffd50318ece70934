"""Tests for dsx.cli_models: MODEL specs, factories, .pt2 programs and example inputs from shapes / dtypes."""

import argparse
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from dsx.cli_models import (add_model_arguments, example_inputs, load_inputs, load_model,
                            model_and_inputs, parse_dtype, parse_shape, random_inputs)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module ``userfacs`` in a fresh working directory that is not yet on sys.path."""
    (tmp_path / "userfacs.py").write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2)
                self.drop = nn.Dropout(0.5)

            def forward(self, x):
                return self.drop(self.fc(x))

        def make():
            torch.manual_seed(0)
            return Net()

        class Zoo:
            @staticmethod
            def small():
                return nn.Linear(3, 1)

        def tensor():
            return torch.ones(2, 4)

        def kwargs():
            return {"x": torch.ones(2, 4)}

        def nothing():
            return [1, 2]

        def boom():
            raise KeyError("no weights")

        VALUE = 5
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield
    sys.modules.pop("userfacs", None)


def test_parse_shape():
    assert parse_shape("2,3,32,32") == (2, 3, 32, 32)
    assert parse_shape("7") == (7,)
    for bad in ("2,x", "", "2,,3", "-1,4", "2.5", "0,3", "2,0"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad shape"):
            parse_shape(bad)


def test_parse_dtype():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("int64") is torch.int64
    for bad in ("float33", "Tensor", "nn"):
        with pytest.raises(argparse.ArgumentTypeError, match="unknown dtype"):
            parse_dtype(bad)


def test_factory_is_loaded_from_the_working_directory(factories):
    model = load_model("userfacs:make")
    assert type(model).__name__ == "Net" and not model.training
    torch.manual_seed(0)
    assert torch.equal(model.fc.weight, nn.Linear(4, 2).weight)
    assert isinstance(load_model("userfacs:Zoo.small"), nn.Linear)


@pytest.mark.parametrize("spec,error,match", [
    ("userfacs", ValueError, "expected package.module:factory, a Hugging Face model folder"),
    (":make", ValueError, "expected package.module:factory"),
    ("nope_module_xyz:make", ValueError, "cannot import module 'nope_module_xyz'"),
    ("userfacs:missing", ValueError, "has no attribute 'missing'"),
    ("userfacs:VALUE", TypeError, "'VALUE' is not callable"),
    ("userfacs:tensor", TypeError, "expected a torch.nn.Module, got Tensor"),
    ("userfacs:boom", ValueError, "the factory raised KeyError"),
])
def test_bad_model_specs_name_the_spec(factories, spec, error, match):
    with pytest.raises(error, match=match) as info:
        load_model(spec)
    assert repr(spec) in str(info.value)


def test_pt2_model_loads_as_a_module(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    loaded = load_model(str(tmp_path / "m.pt2"))
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "other.pt2"))


def test_random_inputs_dtypes_and_ranges():
    x, ids, mask = random_inputs([(2, 3), (4, 5), (6,)], [torch.float16, torch.int64, torch.bool], high=7)
    assert x.dtype == torch.float16 and x.shape == (2, 3)
    assert ids.dtype == torch.int64 and ids.shape == (4, 5) and 0 <= ids.min() and ids.max() < 7
    assert mask.dtype == torch.bool and mask.shape == (6,)
    a, b = random_inputs([(3,), (3,)], [torch.int32])
    assert a.dtype == b.dtype == torch.int32 and a.max() < 100
    (f,) = random_inputs([(8, 8)])
    assert f.dtype == torch.float32 and f.std() > 0.1
    assert torch.equal(random_inputs([(5,)])[0], random_inputs([(5,)])[0])


def test_random_inputs_reject_bad_settings():
    with pytest.raises(ValueError, match="one per --input-shape"):
        random_inputs([(2,), (2,), (2,)], [torch.float32, torch.int64])
    with pytest.raises(ValueError, match="--input-high"):
        random_inputs([(2,)], [torch.int64], high=0)


def test_inputs_factory(factories):
    assert torch.equal(load_inputs("userfacs:tensor"), torch.ones(2, 4))
    assert set(load_inputs("userfacs:kwargs")) == {"x"}
    with pytest.raises(TypeError, match="--inputs 'userfacs:nothing'.*at least one Tensor"):
        load_inputs("userfacs:nothing")
    with pytest.raises(ValueError, match="--inputs 'userfacs:missing'"):
        load_inputs("userfacs:missing")


def test_example_inputs_need_exactly_one_source(factories):
    assert example_inputs(shapes=[(2, 4)])[0].shape == (2, 4)
    assert torch.equal(example_inputs(factory="userfacs:tensor"), torch.ones(2, 4))
    with pytest.raises(ValueError, match="needs example inputs"):
        example_inputs()
    with pytest.raises(ValueError, match="cannot be combined"):
        example_inputs(shapes=[(2, 4)], factory="userfacs:tensor")


def test_parsed_arguments_give_model_and_inputs(factories):
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    model, inputs = model_and_inputs(p.parse_args(["userfacs:make", "--input-shape", "3,4", "--input-dtype",
                                                   "float64"]))
    assert inputs[0].shape == (3, 4) and inputs[0].dtype == torch.float64
    assert model.double()(*inputs).shape == (3, 2)
    with pytest.raises(SystemExit):
        p.parse_args(["userfacs:make", "--input-shape", "2,x"])
