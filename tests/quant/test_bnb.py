"""bitsandbytes bridge: nf4 / llm_int8 accuracy on CPU, bit-exact safetensors reload, dtypes, missing dependency."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from dsx.quant.bnb import require_bitsandbytes, to_bnb

# Relative Frobenius error on a default-initialized 256x512 layer, measured on CPU: nf4 0.091-0.093, llm_int8 0.009.
BOUND = {"nf4": 0.12, "llm_int8": 0.02}
CONFIGS = [("nf4", {}), ("nf4", {"double_quant": True}), ("llm_int8", {})]


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes", reason='the bnb extra is not installed (pip install -e ".[bnb]")')


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(512, 256, bias=bias).eval()


def _inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(4, 8, 512, generator=torch.Generator().manual_seed(1)).to(dtype)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install \"dsx\[bnb\]\".*pip install bitsandbytes"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match="bitsandbytes"):
        to_bnb(nn.Linear(4, 4), "nf4")


@pytest.mark.parametrize("fmt, kwargs", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_close_to_float_and_original_untouched(bnb, fmt, kwargs, bias):
    linear = _linear(bias=bias)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    q = to_bnb(linear, fmt, **kwargs)
    assert isinstance(q, bnb.nn.Linear4bit if fmt == "nf4" else bnb.nn.Linear8bitLt) and not q.training
    assert q.weight.dtype == (torch.uint8 if fmt == "nf4" else torch.int8)
    assert (q.bias is None) == (not bias)
    x = _inputs()
    with torch.no_grad():
        y, ref = q(x), linear(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert 0 < _rel(y, ref) < BOUND[fmt]
    assert all(torch.equal(v, before[k]) for k, v in linear.state_dict().items())


@pytest.mark.parametrize("fmt, kwargs", CONFIGS)
def test_safetensors_round_trip_into_a_fresh_module_is_bit_exact(bnb, tmp_path, fmt, kwargs):
    q = to_bnb(_linear(), fmt, **kwargs)
    x = _inputs()
    with torch.no_grad():
        y = q(x)  # a forward first: bitsandbytes rearranges some state on it
        save_file(q.state_dict(), tmp_path / "layer.safetensors")
        assert torch.equal(q(x), y)
        fresh = to_bnb(_linear(seed=1), fmt, **kwargs)
        used = to_bnb(_linear(seed=2), fmt, **kwargs)
        used(x)
        for target in (fresh, used):
            assert not torch.equal(target(x), y)
            target.load_state_dict(load_file(tmp_path / "layer.safetensors"), strict=True)
            assert torch.equal(target(x), y)


@pytest.mark.parametrize("fmt, kwargs", CONFIGS)
def test_save_model_round_trip_of_a_model(bnb, tmp_path, fmt, kwargs):
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        second = nn.Linear(256, 512)
        return nn.Sequential(to_bnb(_linear(seed), fmt, **kwargs), nn.GELU(), to_bnb(second, fmt, **kwargs))

    model, x = build(0), _inputs()
    save_model(model, str(tmp_path / "model.safetensors"))
    fresh = build(1)
    load_model(fresh, str(tmp_path / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_nf4_load_checks_the_shape(bnb):
    sd = to_bnb(_linear(), "nf4").state_dict()
    wrong = to_bnb(nn.Linear(256, 512), "nf4")
    with pytest.raises(RuntimeError, match=r"the checkpoint quantized a \(256, 512\) weight"):
        wrong.load_state_dict(sd)


@pytest.mark.parametrize("fmt", ["nf4", "llm_int8"])
def test_dtypes(bnb, fmt):
    linear = _linear()
    q = to_bnb(linear, fmt)
    x16 = _inputs(torch.bfloat16)
    with torch.no_grad():
        assert q(x16).dtype == torch.bfloat16
        assert _rel(q(x16), linear(x16.float())) < BOUND[fmt] + 0.02
        half = _linear().to(torch.bfloat16)
        qh = to_bnb(half, fmt)
        assert qh.bias.dtype == torch.bfloat16
        assert qh(x16).dtype == torch.bfloat16 and _rel(qh(x16), half(x16)) < BOUND[fmt] + 0.02
    if fmt == "nf4":
        assert qh.compute_dtype == torch.bfloat16 and q.compute_dtype == torch.float32
        qc = to_bnb(linear, fmt, compute_dtype=torch.bfloat16)
        with torch.no_grad():
            out = qc(_inputs())
        assert out.dtype == torch.float32 and _rel(out, linear(_inputs())) < BOUND[fmt] + 0.02


def test_errors(bnb):
    with pytest.raises(ValueError, match=r"fmt must be one of \('nf4', 'llm_int8'\), got 'int4'"):
        to_bnb(_linear(), "int4")
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
        to_bnb(nn.Conv1d(4, 4, 1), "nf4")
    with pytest.raises(TypeError, match="already a bitsandbytes Linear4bit"):
        to_bnb(to_bnb(_linear(), "nf4"), "llm_int8")
    with pytest.raises(ValueError, match="apply to fmt='nf4' only"):
        to_bnb(_linear(), "llm_int8", compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="apply to fmt='nf4' only"):
        to_bnb(_linear(), "llm_int8", double_quant=True)
    with pytest.raises(TypeError, match="compute_dtype must be a floating torch.dtype"):
        to_bnb(_linear(), "nf4", compute_dtype=torch.int8)
