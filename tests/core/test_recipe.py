"""Tests for dsx.core.recipe: every accepted recipe form, clear errors, and the to_recipe round trip."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from dsx.core.compose import Compose, compose
from dsx.core.recipe import from_recipe, to_recipe
from dsx.core.transform import Transform


@dataclass
class Prune(Transform):
    name = "tr_prune"
    stage = "prune"
    amount: float = 0.5
    structured: bool = False

    def __post_init__(self):
        if not 0 <= self.amount < 1:
            raise ValueError(f"amount must be in [0, 1), got {self.amount}")

    def apply(self, model, inputs):
        return model, {}


@dataclass
class Quant(Transform):
    name = "tr_quant"
    stage = "compress"
    scheme: str = "int8"
    skip: list = None

    def apply(self, model, inputs):
        return model, {}


EXPECTED = Compose((Prune(amount=0.001, structured=True), Quant(), Quant(scheme="fp8", skip=["head"])))
STEPS = [{"tr_prune": {"amount": 0.001, "structured": True}}, "tr_quant",
         {"transform": "tr_quant", "scheme": "fp8", "skip": ["head"]}]
YAML = """
transforms:
  - tr_prune: {amount: 0.001, structured: true}
  - tr_quant
  - transform: tr_quant
    scheme: fp8
    skip: [head]
"""


@pytest.mark.parametrize("recipe", [STEPS, {"transforms": STEPS}, YAML, json.dumps(STEPS),
                                    json.dumps({"transforms": STEPS}, indent=2)])
def test_in_memory_forms(recipe):
    assert from_recipe(recipe) == EXPECTED


def test_json_exponent_floats_stay_floats():
    got = from_recipe('[{"tr_prune": {"amount": 1e-3}}]')
    assert got.transforms[0].amount == 0.001 and isinstance(got.transforms[0].amount, float)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_files(tmp_path, suffix):
    f = tmp_path / f"recipe{suffix}"
    f.write_text(json.dumps({"transforms": STEPS}) if suffix == ".json" else YAML)
    assert from_recipe(f) == EXPECTED
    assert from_recipe(str(f)) == EXPECTED


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        from_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError):
        from_recipe(Path(tmp_path / "recipe"))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown transform 'nope'.*tr_prune"):
        from_recipe(["tr_quant", "nope"])


def test_unknown_field_lists_fields():
    with pytest.raises(ValueError, match=r"step 0 \(tr_prune\).*\['ratio'\].*\['amount', 'structured', 'verify'\]"):
        from_recipe([{"tr_prune": {"ratio": 0.3}}])


def test_bad_values_and_shapes():
    with pytest.raises(ValueError, match=r"step 0 \(tr_prune\): amount must be in"):
        from_recipe([{"tr_prune": {"amount": 2}}])
    with pytest.raises(ValueError, match="mapping"):
        from_recipe([{"tr_prune": 0.3}])
    with pytest.raises(ValueError, match="step 1"):
        from_recipe(["tr_quant", {"tr_prune": {}, "tr_quant": {}}])
    with pytest.raises(ValueError, match="step 0"):
        from_recipe([3])
    with pytest.raises(ValueError, match="got keys"):
        from_recipe({"steps": STEPS})
    with pytest.raises(ValueError, match="list of steps"):
        from_recipe("tr_quant")
    with pytest.raises(ValueError, match="list of steps"):
        from_recipe(42)
    with pytest.raises(ValueError, match="at least one"):
        from_recipe([])


def test_invalid_text():
    with pytest.raises(ValueError, match="YAML"):
        from_recipe("transforms: [unclosed")
    with pytest.raises(ValueError, match="YAML"):
        from_recipe("!!python/object/apply:os.system ['echo unsafe']")


def test_invalid_json_file(tmp_path):
    f = tmp_path / "r.json"
    f.write_text("[{'single': 'quotes'}]")
    with pytest.raises(ValueError, match="invalid JSON"):
        from_recipe(f)


def test_stage_order_checked():
    with pytest.raises(ValueError, match="order"):
        from_recipe(["tr_quant", "tr_prune"])


def test_round_trip_through_dict_json_and_yaml():
    c = compose(Prune(amount=0.25), Quant(scheme="fp8", skip=["a", "b"], verify=False))
    r = to_recipe(c)
    assert r == {"transforms": [{"tr_prune": {"amount": 0.25, "structured": False}},
                                {"tr_quant": {"scheme": "fp8", "skip": ["a", "b"], "verify": False}}]}
    assert from_recipe(r) == c
    assert from_recipe(json.dumps(r)) == c
    assert from_recipe(yaml.safe_dump(r)) == c
    assert to_recipe(Quant()) == {"transforms": [{"tr_quant": {"scheme": "int8", "skip": None}}]}
    assert to_recipe([Prune(), Quant()]) == to_recipe(compose(Prune(), Quant()))


def test_to_recipe_rejects_unregistered():
    @dataclass
    class Anonymous(Transform):
        def apply(self, model, inputs):
            return model, {}

    with pytest.raises(ValueError, match="item 1"):
        to_recipe([Quant(), Anonymous()])
    with pytest.raises(ValueError, match="item 0"):
        to_recipe([torch.nn.Linear(1, 1)])
