import pytest
import torch

from dsx.core.inputs import describe, normalize_inputs, synthesize


def test_forms():
    x = torch.randn(2)
    assert normalize_inputs(x) == ((x,), {})
    assert normalize_inputs([x, 3]) == ((x, 3), {})
    assert normalize_inputs({"a": x}) == ((), {"a": x})


def test_rejects_inputs_without_tensors():
    with pytest.raises(TypeError, match="example_inputs: must contain at least one Tensor"):
        normalize_inputs((1, 2))
    with pytest.raises(TypeError, match="dict keys"):
        normalize_inputs({1: torch.randn(1)})


def test_describe_and_synthesize_keep_shapes_dtypes_and_python_values():
    inputs = ((torch.randn(2, 3), None), {"ids": torch.ones(4, dtype=torch.long), "flag": True})
    args, kwargs = synthesize(describe(inputs))
    assert args[0].shape == (2, 3) and args[0].dtype == torch.float32 and args[1] is None
    assert kwargs["ids"].dtype == torch.long and kwargs["flag"] is True
