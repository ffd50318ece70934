import importlib.util
import sys
import types

import pytest
import torch
import torch.nn as nn

import dsx
import dsx.export.tensorrt as trt_export
from dsx.export.tensorrt import export_tensorrt
from dsx.models import TinyResNet, randomize_batchnorm

HAS_TRT = torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt") is not None


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("precision", ["bf16", "FP16", 16])
def test_bad_precision_is_rejected_before_any_device_check(tmp_path, precision):
    with pytest.raises(ValueError, match=r"precision: expected one of \(None, 'fp32', 'fp16', 'int8'\)"):
        export_tensorrt(mlp(), torch.randn(2, 8), tmp_path / "m.engine", precision=precision)


def test_int8_needs_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="dsx.quantize"):
        export_tensorrt(mlp(), torch.randn(2, 8), tmp_path / "m.engine", precision="int8")


def test_argument_errors_name_the_argument(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TypeError, match="model"):
        export_tensorrt(lambda x: x, torch.randn(2, 8), tmp_path / "m.engine")
    with pytest.raises(TypeError, match="example_inputs"):
        export_tensorrt(mlp(), 3, tmp_path / "m.engine")


def test_missing_cuda_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU") as info:
        export_tensorrt(mlp(), torch.randn(2, 8), tmp_path / "m.engine")
    assert 'pip install "dsx[trt]"' in str(info.value)
    assert not (tmp_path / "m.engine").exists()


def test_missing_torch_tensorrt_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # makes `import torch_tensorrt` raise ImportError
    with pytest.raises(RuntimeError, match="needs torch_tensorrt, which is not installed") as info:
        export_tensorrt(mlp(), torch.randn(2, 8), tmp_path / "m.ts", precision="fp16")
    assert 'pip install "dsx[trt]"' in str(info.value) and "TensorRT libraries" in str(info.value)


class FakeTorchTensorRT(types.ModuleType):
    """Records the calls export_tensorrt makes; "compiles" to the exported program's own module, so the saved
    file is a real (non-TensorRT) program that the verification step reloads and runs."""

    def __init__(self):
        super().__init__("torch_tensorrt")
        self.__version__ = "fake"
        self.calls = []
        self.dynamo = types.SimpleNamespace(convert_exported_program_to_serialized_trt_engine=self.convert)

    def compile(self, program, **kwargs):
        self.calls.append(("compile", program, kwargs))
        return program.module()

    def save(self, module, path, **kwargs):
        self.calls.append(("save", path, kwargs))
        args, kwarg_inputs = tuple(kwargs["arg_inputs"]), kwargs["kwarg_inputs"]
        if kwargs["output_format"] == "torchscript":
            torch.jit.trace(module, args).save(path)
        else:
            torch.export.save(torch.export.export(module, args, kwarg_inputs, strict=False), path)

    def convert(self, program, **kwargs):
        self.calls.append(("convert", program, kwargs))
        return b"serialized engine"


@pytest.fixture
def fake_trt(monkeypatch):
    fake = FakeTorchTensorRT()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt_export, "DEVICE", "cpu")
    return fake


@pytest.mark.parametrize("suffix, output_format", [(".ep", "exported_program"), (".ts", "torchscript")])
def test_compile_and_save_calls(tmp_path, fake_trt, suffix, output_format):
    model, x = mlp(), torch.randn(2, 8)
    path = tmp_path / "out" / f"m{suffix}"
    result = export_tensorrt(model, x, path)
    (_, program, compile_kwargs), (_, save_path, save_kwargs) = fake_trt.calls
    assert isinstance(program, torch.export.ExportedProgram)
    assert compile_kwargs.keys() == {"ir", "arg_inputs", "kwarg_inputs", "use_explicit_typing"}
    assert compile_kwargs["ir"] == "dynamo" and compile_kwargs["use_explicit_typing"] is True
    torch.testing.assert_close(compile_kwargs["arg_inputs"], [x])
    assert compile_kwargs["kwarg_inputs"] == {}
    assert save_path == str(path) and save_kwargs["output_format"] == output_format
    torch.testing.assert_close(save_kwargs["arg_inputs"], [x])
    assert result.path == path and path.is_file() and result.format == "tensorrt"
    assert result.max_rel < 1e-6 and "verified by reloading the file on CUDA" in result.notes


def test_fp16_casts_model_and_inputs_and_keeps_the_callers_model(tmp_path, fake_trt):
    model, x = randomize_batchnorm(TinyResNet(width=8)).eval(), torch.randn(2, 3, 16, 16)
    result = export_tensorrt(model, x, tmp_path / "m.ep", precision="fp16")
    _, program, kwargs = fake_trt.calls[0]
    assert kwargs["arg_inputs"][0].dtype == torch.float16
    assert {p.dtype for p in program.parameters()} == {torch.float16}
    assert 1e-4 < result.max_rel < 1e-2  # really ran in half precision, within the fp16 tolerance
    assert "weights cast to float16: feed float16 inputs" in result.notes
    assert next(model.parameters()).dtype == torch.float32 and model.fc.weight.device.type == "cpu"


def test_fp16_over_a_tight_tolerance_raises(tmp_path, fake_trt):
    model, x = randomize_batchnorm(TinyResNet(width=8)).eval(), torch.randn(2, 3, 16, 16)
    with pytest.raises(dsx.VerificationError, match="over rtol 1e-07"):
        export_tensorrt(model, x, tmp_path / "m.ep", precision="fp16", rtol=1e-7)


def test_engine_is_serialized_from_the_program(tmp_path, fake_trt):
    path = tmp_path / "m.engine"
    result = export_tensorrt(mlp(), {"input": torch.randn(2, 8)}, path, verify=False)
    [(name, program, kwargs)] = fake_trt.calls
    assert name == "convert" and isinstance(program, torch.export.ExportedProgram)
    assert kwargs["arg_inputs"] == [] and set(kwargs["kwarg_inputs"]) == {"input"} and kwargs["use_explicit_typing"]
    assert path.read_bytes() == b"serialized engine" and result.max_rel is None


def test_batch_dynamic_shapes_reach_the_program(tmp_path, fake_trt):
    export_tensorrt(mlp(), torch.randn(2, 8), tmp_path / "m.ep", dynamic_shapes="batch")
    _, program, _ = fake_trt.calls[0]
    [placeholder] = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == "input"]
    assert isinstance(placeholder.meta["val"].shape[0], torch.SymInt)


@pytest.mark.skipif(not HAS_TRT, reason="needs a CUDA GPU and torch_tensorrt")
@pytest.mark.parametrize("suffix", [".engine", ".ts", ".ep"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_tensorrt(tmp_path, suffix, precision):
    model, x = randomize_batchnorm(TinyResNet(width=8)).eval(), torch.randn(2, 3, 16, 16)
    result = export_tensorrt(model, x, tmp_path / f"m{suffix}", precision=precision)
    assert result.path.stat().st_size > 0
    assert result.max_rel < (1e-2 if precision == "fp16" else 1e-3)
