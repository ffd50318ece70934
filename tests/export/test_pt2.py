import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dsx
import dsx.export.pt2 as pt2
from dsx.export.pt2 import export_pt2, load_pt2, register_dsx_ops
from dsx.models import TinyGPT, TinyResNet, randomize_batchnorm
from tests.hf_models import tiny_hf

ROOT = Path(__file__).resolve().parents[2]


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()


def dsx_ops(module):
    return sorted({str(n.target) for n in module.graph.nodes if str(n.target).startswith("dsx.")})


def test_mlp_round_trip_is_a_serialized_program_and_matches(tmp_path):
    model, x = mlp(), torch.randn(3, 8)
    result = export_pt2(model, x, tmp_path / "sub" / "mlp.pt2")
    assert result.path == tmp_path / "sub" / "mlp.pt2" and result.format == "pt2"
    assert result.max_rel is not None and result.max_rel < 1e-6
    assert zipfile.is_zipfile(result.path)  # torch.export's archive, not a pickled module
    torch.testing.assert_close(load_pt2(result.path)(x), model(x))


def test_resnet_with_batchnorm_statistics(tmp_path):
    model = randomize_batchnorm(TinyResNet(width=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    result = export_pt2(model, (x,), tmp_path / "resnet.pt2")
    assert result.max_rel < 1e-5
    torch.testing.assert_close(load_pt2(result.path)(x), model(x), rtol=1e-5, atol=1e-5)


def test_hf_bert_with_keyword_inputs(tmp_path):
    model, kwargs = tiny_hf("bert")
    result = export_pt2(model, kwargs, tmp_path / "bert.pt2")
    assert result.max_rel < 1e-5
    out = load_pt2(result.path)(**kwargs)
    torch.testing.assert_close(out.last_hidden_state, model(**kwargs).last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def optimized_gpt():
    torch.manual_seed(0)
    model = TinyGPT(vocab=64, dim=32, layers=2, heads=4, max_len=16).eval()
    x = torch.randint(0, 64, (2, 16))
    return model, dsx.Fuse("all", dynamic_batch=True)(model, x), x


def test_optimized_model_keeps_dsx_ops_and_varies_batch(tmp_path, optimized_gpt):
    model, optimized, x = optimized_gpt
    assert dsx_ops(optimized)
    result = export_pt2(optimized, x, tmp_path / "gpt.pt2", dynamic_shapes="batch")
    assert result.max_rel < 1e-5
    loaded = load_pt2(result.path)
    assert dsx_ops(loaded) == ["dsx.add_layer_norm.default", "dsx.bias_act.default"]
    x3 = torch.randint(0, 64, (3, 16))
    torch.testing.assert_close(loaded(x3), model(x3), rtol=1e-4, atol=1e-4)


def test_static_export_rejects_another_batch(tmp_path):
    model = mlp()
    loaded = load_pt2(export_pt2(model, torch.randn(2, 8), tmp_path / "m.pt2").path)
    with pytest.raises(Exception):
        loaded(torch.randn(5, 8))
    dynamic = load_pt2(export_pt2(model, torch.randn(2, 8), tmp_path / "d.pt2", dynamic_shapes="batch").path)
    x = torch.randn(5, 8)
    torch.testing.assert_close(dynamic(x), model(x))


def test_fresh_process_loads_dsx_ops(tmp_path, optimized_gpt):
    model, optimized, x = optimized_gpt
    path = export_pt2(optimized, x, tmp_path / "gpt.pt2").path
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    code = ("import sys, torch; from dsx.export.pt2 import load_pt2; m = load_pt2(sys.argv[1]); "
            "io = torch.load(sys.argv[2]); torch.testing.assert_close(m(io['x']), io['y'], rtol=1e-4, atol=1e-4); "
            "print(sorted({str(n.target) for n in m.graph.nodes if str(n.target).startswith('dsx.')}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "io.pt")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dsx.add_layer_norm.default" in proc.stdout and "dsx.bias_act.default" in proc.stdout


def test_register_dsx_ops_imports_every_kernel_module(monkeypatch):
    names = {f"dsx.kernels.{p.stem}" for p in (ROOT / "dsx" / "kernels").glob("*.py") if not p.stem.startswith("_")}
    assert "dsx.kernels.add_layer_norm" in names
    imported = []
    monkeypatch.setattr(pt2.importlib, "import_module", imported.append)
    register_dsx_ops()
    assert set(imported) == names


def test_training_model_is_exported_in_eval_mode(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    x = torch.randn(4, 8)
    result = export_pt2(model, x, tmp_path / "m.pt2")
    assert model.training and "exported in eval mode" in result.notes
    torch.testing.assert_close(load_pt2(result.path)(x), model.eval()(x))


def test_verification_failure_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(pt2, "load_pt2", lambda path: nn.Sequential(mlp(), nn.ReLU()))
    with pytest.raises(dsx.VerificationError, match="relative error"):
        export_pt2(mlp(), torch.randn(2, 8), tmp_path / "m.pt2")


def test_without_verification_and_missing_file(tmp_path):
    result = export_pt2(mlp(), torch.randn(2, 8), tmp_path / "m.pt2", verify=False)
    assert result.path.is_file() and result.max_rel is None and str(result).endswith("(not verified)")
    with pytest.raises(FileNotFoundError, match="nope.pt2"):
        load_pt2(tmp_path / "nope.pt2")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rewrite(src, dst, replace):
    """Copy the zip archive ``src`` to ``dst`` with ``replace(name, data) -> data`` applied to each member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace(info.filename, zin.read(info.filename)))


def _pickled(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("member", ["sample_inputs", "pickled_weight", "opaque_object", "compiled_code"])
def test_crafted_archive_is_refused_and_runs_nothing(tmp_path, member):
    good = export_pt2(mlp(), torch.randn(2, 8), tmp_path / "good.pt2").path
    marker = tmp_path / "pwned"
    payload = _pickled(_RunsCode(marker))
    evil = tmp_path / "evil.pt2"

    def replace(name, data):
        if member == "sample_inputs" and "sample_inputs/" in name:
            return payload
        if member == "pickled_weight" and name.endswith("_weights_config.json"):
            config = __import__("json").loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return __import__("json").dumps(config).encode()
        if member == "pickled_weight" and name.endswith("weight_0"):
            return payload
        return data

    _rewrite(good, evil, replace)
    if member in ("opaque_object", "compiled_code"):
        extra = "data/constants/opaque_obj_0" if member == "opaque_object" else "data/aotinductor/model/m.so"
        with zipfile.ZipFile(evil, "a") as z:
            z.writestr(f"{zipfile.ZipFile(good).namelist()[0].split('/')[0]}/{extra}", payload)
    with pytest.raises(ValueError, match="load_pt2: .*(refused|pickled Python object|compiled AOTInductor)"):
        load_pt2(evil)
    assert not marker.exists()
    assert load_pt2(good)(torch.ones(2, 8)).shape == (2, 4)
    if member == "sample_inputs":  # the crafted file is a real exploit: plain torch.export.load runs it
        try:
            torch.export.load(evil)
        except Exception:
            pass
        assert marker.exists()


def test_crafted_archive_is_refused_by_the_cli(tmp_path):
    good = export_pt2(mlp(), torch.randn(2, 8), tmp_path / "good.pt2").path
    marker = tmp_path / "pwned"
    _rewrite(good, tmp_path / "evil.pt2",
             lambda name, data: _pickled(_RunsCode(marker)) if "sample_inputs/" in name else data)
    proc = subprocess.run([sys.executable, "-m", "dsx", "export", str(tmp_path / "evil.pt2"), str(tmp_path / "o.onnx"),
                           "--input-shape", "2,8"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "refused" in proc.stderr
    assert not marker.exists()


def test_not_a_pt2_archive(tmp_path):
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        load_pt2(tmp_path / "junk.pt2")
