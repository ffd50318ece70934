"""Candidate plans come from the format registry, filtered by the device; formats= is validated."""

import pytest
import torch

import dsx.quant.config as quant_config
from dsx.auto.plans import candidates, check_formats, format_configs, plan_name
from dsx.quant.config import BFloat16, Int8Dynamic, native_dtype

CPU = torch.device("cpu")
BF16 = native_dtype(CPU, torch.bfloat16)


def names(plans):
    return [p.name for p in plans]


def test_lossless_tries_only_the_compiled_model():
    assert names(candidates(CPU, lossy=False, formats=None, calibrated=False, compile=True)) == ["compile"]
    assert candidates(CPU, lossy=False, formats=None, calibrated=False, compile=False) == []


def test_lossy_cpu_candidates_are_the_formats_fast_here():
    got = names(candidates(CPU, lossy=True, formats=None, calibrated=False, compile=False))
    assert "int8" in got and "int8_weight_only" in got
    assert not {"fp8", "nf4", "llm_int8", "embedding", "int8_static", "2:4+bf16"} & set(got)
    assert ("bf16" in got and "int8+bf16" in got) == BF16
    assert "int8_static" in names(candidates(CPU, lossy=True, formats=None, calibrated=True, compile=False))


@pytest.mark.parametrize("int8_dot", [True, False])
def test_int8_static_is_compiled_only_where_the_cpu_has_int8_dot_products(monkeypatch, int8_dot):
    monkeypatch.setattr(quant_config, "has_int8_dot", lambda: int8_dot)  # without: torch._int_mm is a scalar loop
    got = names(candidates(CPU, lossy=True, formats=None, calibrated=True, compile=True))
    assert {"int8", "int8_static", "int8_weight_only+compile", "int8+compile"} <= set(got)
    assert ("int8_static+compile" in got) == int8_dot  # the dynamic formats call fbgemm from compiled graphs
    assert ("int8_w7" in got) == ("int8_w7+compile" in got) != int8_dot


def test_given_formats_are_tried_as_given():
    plans = candidates(CPU, lossy=True, formats=["int8+bf16", BFloat16(), "2:4"], calibrated=False, compile=False)
    assert names(plans) == ["int8+bf16", "bf16", "2:4+" + ("bf16" if BF16 else "fp16")]
    assert plans[0].quantize == Int8Dynamic(dtype="bfloat16")
    assert [plan_name(c) for c in format_configs(CPU, ["int8_weight_only+fp16"], False)] == ["int8_weight_only+fp16"]


@pytest.mark.parametrize("formats,error,match", [
    ("int8", TypeError, "expected a list"),
    ([], ValueError, "the list is empty"),
    (["int8", None], TypeError, "expected format names"),
    (["int8+bf8"], ValueError, "unknown format 'int8\\+bf8'"),
])
def test_bad_formats(formats, error, match):
    with pytest.raises(error, match=f"formats: {match}"):
        check_formats(formats)
