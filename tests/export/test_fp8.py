"""ONNX export of dsx fp8 linears: a row-wise float8 QuantizeLinear (opset >= 19) that onnxruntime runs."""

import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dsx  # noqa: E402
from dsx.export.fp8 import FP8QDQLinear  # noqa: E402
from dsx.export.onnx import export_onnx, run_onnx  # noqa: E402
from dsx.quant.linear import FP8Linear, fp8_supported  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def onnx_ops(path) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}


def test_export_form_matches_the_fp8_linear_on_3d_inputs():
    if reason := fp8_supported(torch.device("cpu")):
        pytest.skip(reason)
    torch.manual_seed(0)
    src = FP8Linear.from_float(nn.Linear(16, 8))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(FP8QDQLinear(src)(x), src(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["fp8", "fp8_weight_only"])
def test_fp8_exports_as_float8_and_needs_opset_19(tmp_path, fmt):
    if fmt == "fp8" and (reason := fp8_supported(torch.device("cpu"))):
        pytest.skip(reason)
    q = dsx.quantize(mlp(), fmt, progress=False)
    res = export_onnx(q, torch.randn(3, 16), tmp_path / "q.onnx", dynamic_shapes="batch")
    if fmt == "fp8":
        assert ("", "QuantizeLinear") in onnx_ops(res.path)
    x = torch.randn(5, 16)
    (got,) = run_onnx(res.path, {"input": x})
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(got.flatten(), q(x).flatten(), dim=0) > 0.999
    with pytest.raises(ValueError, match="opset: float8 layers need ONNX opset >= 19, got 18"):
        export_onnx(q, torch.randn(3, 16), tmp_path / "q18.onnx", opset=18)
