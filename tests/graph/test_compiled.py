"""The Compile transform: torch.compile with the dsx backend on the module itself (same class, any shape)."""

import copy

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.graph.compiled import CompiledCall, is_compiled


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4)).eval()


def test_compiled_module_keeps_its_class_and_serves_other_shapes(tmp_path):
    model, x = mlp(), torch.randn(4, 16)
    out = dsx.Compile()(model, x)
    assert type(out) is nn.Sequential and is_compiled(out) and not is_compiled(model)
    assert isinstance(out._compiled_call_impl, CompiledCall)
    for rows in (1, 7):
        y = torch.randn(rows, 16)
        torch.testing.assert_close(out(y), model(y), rtol=1e-5, atol=1e-6)
    assert dsx.history(out)[-1]["error"]["max_rel"] < 1e-4
    assert not is_compiled(copy.deepcopy(out)), "as with nn.Module.compile, a copy is not compiled"
    dsx.save(out, tmp_path / "m")
    again = dsx.load(mlp(), tmp_path / "m")
    assert is_compiled(again) and torch.equal(again(x), out(x))


def test_bad_input_and_compiling_twice():
    model, x = mlp(), torch.randn(4, 16)
    with pytest.raises(TypeError, match="dynamic: expected True, False or None"):
        dsx.Compile(dynamic="yes")
    with pytest.raises(ValueError, match="passes: unknown pass 'nope'"):
        dsx.Compile(["nope"])
    with pytest.raises(ValueError, match="compile: the model is already compiled"):
        dsx.Compile(inplace=True)(dsx.Compile()(model), x)
    with pytest.raises(ValueError, match="cannot apply 'quantize' after 'compile'"):
        dsx.quantize(dsx.Compile()(model), "int8")
