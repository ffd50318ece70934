from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dsx
import dsx.export.onnx
import dsx.export.pt2
import dsx.export.tensorrt
from dsx.export import export
from dsx.export.pt2 import load_pt2
from dsx.export.result import ExportResult


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture
def calls(monkeypatch):
    """Replace the three exporters with recorders."""
    seen = []
    for module, name, fmt in [(dsx.export.onnx, "export_onnx", "onnx"), (dsx.export.pt2, "export_pt2", "pt2"),
                              (dsx.export.tensorrt, "export_tensorrt", "tensorrt")]:
        def record(model, example_inputs, path, _fmt=fmt, **kwargs):
            seen.append((_fmt, path, kwargs))
            return ExportResult(Path(path), _fmt)
        monkeypatch.setattr(module, name, record)
    return seen


@pytest.mark.parametrize("name, fmt, kwargs", [
    ("m.onnx", "onnx", {"dynamic_shapes": "batch", "opset": 18, "verify": False}),
    ("m.pt2", "pt2", {"dynamic_shapes": "batch", "verify": False}),
    ("m.engine", "tensorrt", {"precision": "fp16", "dynamic_shapes": "batch", "verify": False}),
    ("m.ts", "tensorrt", {"precision": None, "dynamic_shapes": "batch", "verify": False}),
])
def test_suffix_picks_the_exporter(tmp_path, calls, name, fmt, kwargs):
    path = tmp_path / "a" / "b" / name
    extra = {k: v for k, v in kwargs.items() if k not in ("dynamic_shapes", "verify")}
    result = export(mlp(), torch.randn(2, 8), str(path), dynamic_shapes="batch", verify=False, **extra)
    assert calls == [(fmt, path, kwargs)]
    assert result.format == fmt and path.parent.is_dir()


def test_format_argument_overrides_an_unknown_suffix(tmp_path, calls):
    export(mlp(), torch.randn(2, 8), tmp_path / "m.ep", format="tensorrt", precision="fp32")
    assert calls == [("tensorrt", tmp_path / "m.ep", {"precision": "fp32", "dynamic_shapes": None, "verify": True})]


def test_bad_suffix_names_the_path_and_the_choices(tmp_path, calls):
    with pytest.raises(ValueError, match=r"m\.pth.*'\.engine', '\.onnx', '\.pt2', '\.ts'.*'onnx', 'pt2', 'tensorrt'"):
        export(mlp(), torch.randn(2, 8), tmp_path / "m.pth")
    assert calls == [] and not list(tmp_path.iterdir())


def test_bad_or_conflicting_format(tmp_path, calls):
    with pytest.raises(ValueError, match="format: expected one of"):
        export(mlp(), torch.randn(2, 8), tmp_path / "m.bin", format="tflite")
    with pytest.raises(ValueError, match="has the onnx suffix '.onnx', but format='pt2'"):
        export(mlp(), torch.randn(2, 8), tmp_path / "m.onnx", format="pt2")
    assert calls == []


def test_opset_only_for_onnx(tmp_path, calls):
    with pytest.raises(ValueError, match="opset: only the onnx format takes an opset, not pt2"):
        export(mlp(), torch.randn(2, 8), tmp_path / "m.pt2", opset=18)
    assert calls == []


def test_precision_only_for_tensorrt(tmp_path, calls):
    with pytest.raises(ValueError, match=r"precision: only the tensorrt format \(.engine / .ts\).*not onnx"):
        export(mlp(), torch.randn(2, 8), tmp_path / "m.onnx", precision="fp16")
    assert calls == []


def test_model_and_inputs_are_checked(tmp_path, calls):
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        export(lambda x: x, torch.randn(2, 8), tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="example_inputs"):
        export(mlp(), [1, 2], tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="example_inputs"):
        export(mlp(), "x", tmp_path / "m.pt2")
    assert calls == []


def test_pt2_end_to_end(tmp_path):
    model, x = mlp(), torch.randn(3, 8)
    result = export(model, x, tmp_path / "out" / "m.pt2", dynamic_shapes="batch")
    assert result.format == "pt2" and result.max_rel < 1e-6
    x5 = torch.randn(5, 8)
    torch.testing.assert_close(load_pt2(result.path)(x5), model(x5))


def test_dsx_export_is_callable_and_keeps_its_submodules(tmp_path):
    model = torch.nn.Linear(4, 3)
    result = dsx.export(model, torch.randn(2, 4), tmp_path / "m.pt2")
    assert result.path == tmp_path / "m.pt2" and result.path.exists()
    assert dsx.export.pt2.load_pt2 is not None and dsx.export.onnx.export_onnx is not None
