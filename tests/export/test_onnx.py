"""ONNX export round trips, each verified in onnxruntime: plain and dsx-optimized models, dynamic shapes, errors."""

import sys

import pytest
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export import Dim

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dsx  # noqa: E402
from dsx.core.transform import VerificationError, compare_outputs  # noqa: E402
from dsx.export.onnx import contiguous_views, export_onnx, run_onnx  # noqa: E402
from dsx.quant.linear import fp8_supported  # noqa: E402
from dsx.models import TinyResNet, randomize_batchnorm  # noqa: E402
from tests.hf_models import tiny_hf  # noqa: E402

TOL = 1e-4


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def onnx_ops(path) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}


def dsx_ops(model: nn.Module) -> set[str]:
    """The ``torch.ops.dsx`` ops in the graphs of an optimized model."""
    return {str(n.target) for m in model.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("dsx.")}


def torch_outputs(model: nn.Module, kwargs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return [x for x in pytree.tree_leaves(model(**kwargs)) if isinstance(x, torch.Tensor)]


def test_mlp_round_trip_writes_one_self_contained_checked_file(tmp_path):
    path = tmp_path / "out" / "mlp.onnx"
    result = export_onnx(mlp(), torch.randn(3, 16), path)
    assert result.path == path and result.format == "onnx"
    assert result.max_rel < TOL and result.max_abs is not None
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlp.onnx"]
    model = onnx.load(str(path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [o.version for o in model.opset_import if o.domain == ""] == [20]
    assert any("onnxruntime" in note for note in result.notes)


def test_batch_shorthand_makes_dim_0_dynamic_and_opset_is_honoured(tmp_path):
    model = mlp()
    path = tmp_path / "mlp.onnx"
    result = export_onnx(model, (torch.randn(4, 16),), path, dynamic_shapes="batch", opset=18)
    assert result.max_rel < TOL
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain == ""] == [18]
    x = torch.randn(9, 16)
    (name,) = {i.name for i in onnx.load(str(path)).graph.input}
    assert compare_outputs(model(x).detach(), run_onnx(path, {name: x})[0])["max_rel"] < TOL


@pytest.mark.parametrize("opset", [3, 17, "20", 20.0])
def test_an_opset_the_exporter_cannot_write_is_refused(tmp_path, opset):
    with pytest.raises(ValueError, match=f"opset: torch's ONNX exporter writes opset 18 or newer; got {opset!r}"):
        export_onnx(mlp(), torch.randn(4, 16), tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def test_a_dynamic_batch_on_a_batch_of_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dynamic_shapes='batch' needs a batch size >= 2"):
        export_onnx(mlp(), torch.randn(1, 16), tmp_path / "m.onnx", dynamic_shapes="batch")


def test_tiny_resnet_with_random_batchnorm(tmp_path):
    model = randomize_batchnorm(TinyResNet()).eval()
    result = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "resnet.onnx")
    assert result.max_rel < TOL


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hf_models_with_dynamic_batch_and_sequence(tmp_path, name):
    model, kwargs = tiny_hf(name)
    fixed = {"use_cache": False} if name == "gpt2" else {}
    dims = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    spec = {"input_ids": dims, "attention_mask": dims, **{k: None for k in fixed}}
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, {**kwargs, **fixed}, path, dynamic_shapes=spec)
    assert result.max_rel < TOL
    ids = torch.randint(0, 100, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 6:] = 0
    out = run_onnx(path, {"input_ids": ids, "attention_mask": mask})
    ref = torch_outputs(model, {"input_ids": ids, "attention_mask": mask, **fixed})
    assert out[0].shape == (3, 11, 64)
    assert compare_outputs(ref, out)["max_rel"] < TOL


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_optimized_hf_models_lower_dsx_ops_to_standard_onnx(tmp_path, name):
    model, kwargs = tiny_hf(name)
    optimized = dsx.Fuse("all")(model, kwargs)
    assert {"dsx.add_layer_norm.default", "dsx.bias_act.default"} <= dsx_ops(optimized)
    path = tmp_path / f"{name}_dsx.onnx"
    result = export_onnx(optimized, kwargs, path)
    assert result.max_rel < TOL
    ops = onnx_ops(path)
    assert {("", "LayerNormalization"), ("", "Gelu"), ("", "Softmax")} <= ops
    assert {domain for domain, _ in ops} == {""}
    fixed = {"use_cache": False} if name == "gpt2" else {}
    assert compare_outputs(torch_outputs(model, {**kwargs, **fixed}), run_onnx(path, kwargs))["max_rel"] < TOL


@pytest.mark.parametrize("name,fused", [
    ("gpt2", {"dsx.scaled_masked_softmax.default"}),
    ("llama", {"dsx.add_rms_norm.default", "dsx.rms_norm.default", "dsx.gated_act.default",
               "dsx.scaled_masked_softmax.default"}),
])
def test_optimized_models_with_the_softmax_norm_and_gated_kernels(tmp_path, name, fused):
    model, kwargs = tiny_hf(name)
    passes = [p for p in dsx.available_passes() if p != "attention_to_sdpa"]
    optimized = dsx.Fuse(passes)(model, kwargs)
    assert fused <= dsx_ops(optimized)
    path = tmp_path / f"{name}.onnx"
    assert export_onnx(optimized, kwargs, path).max_rel < TOL
    assert {domain for domain, _ in onnx_ops(path)} == {""}


def test_corrupted_weights_fail_verification(tmp_path, monkeypatch):
    save = torch.onnx.ONNXProgram.save

    def save_then_corrupt(self, destination, **kwargs):
        save(self, destination, **kwargs)
        model = onnx.load(str(destination))
        weight = max(model.graph.initializer, key=lambda t: len(onnx.numpy_helper.to_array(t).ravel()))
        weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.01, weight.name))
        onnx.save(model, str(destination))

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save_then_corrupt)
    with pytest.raises(VerificationError, match="max relative error"):
        export_onnx(mlp(), torch.randn(3, 16), tmp_path / "bad.onnx")
    result = export_onnx(mlp(), torch.randn(3, 16), tmp_path / "unverified.onnx", verify=False)
    assert result.max_rel is None and result.path.is_file()


def test_training_mode_model_is_exported_in_eval_mode(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    result = export_onnx(model, torch.randn(4, 8), tmp_path / "drop.onnx")
    assert result.max_rel < TOL and "exported in eval mode" in result.notes
    assert model.training


def test_path_must_end_in_onnx(tmp_path):
    with pytest.raises(ValueError, match=r"path: .*\.onnx"):
        export_onnx(mlp(), torch.randn(3, 16), tmp_path / "model.pt")


@pytest.mark.parametrize("fmt,node", [("int8", "MatMulInteger"), ("int8_static", "QuantizeLinear"),
                                      ("int8_weight_only", "DequantizeLinear")])
def test_quantized_mlp_exports_integer_ops_with_dynamic_batch(tmp_path, fmt, node):
    torch.manual_seed(0)
    calibration = [torch.randn(8, 16) for _ in range(4)] if fmt == "int8_static" else None
    q = dsx.quantize(mlp(), fmt, calibration=calibration, progress=False)
    res = export_onnx(q, torch.randn(3, 16), tmp_path / "q.onnx", dynamic_shapes="batch")
    assert node in {op for _, op in onnx_ops(res.path)} and any("cosine" in n for n in res.notes)
    x = torch.randn(7, 16)
    (got,) = run_onnx(res.path, {"input": x})
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(got.flatten(), q(x).flatten(), dim=0) > 0.999


@pytest.mark.parametrize("name,fmt", [("bert", "int8"), ("gpt2", "int8"), ("bert", "int8_static"), ("gpt2", "fp8")])
def test_quantized_hf_models_with_dynamic_batch_and_sequence(tmp_path, name, fmt):
    if fmt == "fp8" and (reason := fp8_supported(torch.device("cpu"))):
        pytest.skip(reason)
    model, kwargs = tiny_hf(name)
    fixed = {"use_cache": False} if name == "gpt2" else {}
    calibration = [kwargs] * 2 if fmt == "int8_static" else None
    q = dsx.quantize(model, fmt, calibration=calibration, progress=False)
    dims = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    spec = {"input_ids": dims, "attention_mask": dims, **{k: None for k in fixed}}
    res = export_onnx(q, {**kwargs, **fixed}, tmp_path / f"{name}.onnx", dynamic_shapes=spec)
    assert ("", "MatMulInteger" if fmt == "int8" else "QuantizeLinear") in onnx_ops(res.path)
    assert res.max_rel is not None
    ids = torch.randint(0, 100, (3, 11))
    feeds = {"input_ids": ids, "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    got = run_onnx(res.path, feeds)[0]
    ref = torch_outputs(q, {**feeds, **fixed})[0]
    assert got.shape == (3, 11, 64)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("how", ["unstructured", "2:4", "2:4+int8", "structured"])
def test_pruned_and_sparse_models_export_their_weights(tmp_path, how):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    x = torch.randn(8, 64)
    if how == "unstructured":
        model = dsx.prune(model, 0.5)
    elif how == "structured":
        model = dsx.prune(model, 0.5, structured=True, example_inputs=x)
    else:
        model = dsx.sparsify(model, "2:4")
        model = dsx.quantize(model, "int8", progress=False) if how.endswith("int8") else model
    res = export_onnx(model, x, tmp_path / "m.onnx", dynamic_shapes="batch")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(res.path)).graph.initializer}
    big = [w for w in weights.values() if w.ndim == 2]
    assert len(big) == 2
    if how == "structured":
        assert {w.shape for w in big} != {(128, 64), (32, 128)} and (res.max_rel or 0) < TOL
    else:
        # dense tensors holding the zeros (int8 weights go in as uint8 with zero point 128), no mask inputs
        assert all((w == (128 if w.dtype == np.uint8 else 0)).mean() >= 0.5 for w in big)
    (got,) = run_onnx(res.path, {"input": torch.randn(3, 64)})
    assert got.shape == (3, 32)


def test_qat_models_are_refused_until_converted(tmp_path):
    q = dsx.quantize(mlp().train(), "int8", qat=True)
    with pytest.raises(ValueError, match=r"model: '0' \(QATLinear\) cannot be exported to ONNX"):
        export_onnx(q, torch.randn(3, 16), tmp_path / "q.onnx")


def test_missing_onnx_packages_raise_import_error_with_the_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r'pip install "dsx\[onnx\]"'):
        export_onnx(mlp(), torch.randn(3, 16), tmp_path / "m.onnx")


class _TransposeView(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], -1) * 2


def test_contiguous_views_puts_a_contiguous_clone_before_every_view():
    x = torch.randn(2, 3, 4)
    program = contiguous_views(torch.export.export(_TransposeView(), (x,), strict=False))
    nodes = list(program.graph.nodes)
    views = [n for n in nodes if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default)]
    assert views and all(n.args[0].target is torch.ops.aten.clone.default for n in views)
    assert torch.equal(program.module()(x), _TransposeView()(x))
