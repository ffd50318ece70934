import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsx as dsx_api
from dsx.cli import main
from dsx.graph.pass_manager import available_passes


def test_passes_lists_every_pass_in_order(capsys):
    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(available_passes())


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "dsx", "passes"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "attention_to_sdpa" in res.stdout


def test_the_installed_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "dsx"
    if not script.exists():
        pytest.skip("the dsx console script is not installed next to this Python (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)])}
    res = subprocess.run([str(script), "optimize", "cli_factory:mlp", "--input-shape", "4,16", "--quantize", "int8",
                          "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "quantize   compress  format={format=int8" in res.stdout
    res = subprocess.run([str(script), "optimize", "cli_factory:mlp", "--input-shape", "4,16", "--prune", "2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--prune: expected a fraction in [0, 1)" in res.stderr


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--budget-s", "0"])
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "invalid choice" in capsys.readouterr().err


FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


def dsx(cwd, *args, timeout=300):
    """Run ``python -m dsx`` in ``cwd`` with the fixture factories importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "dsx", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(res):
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def fixture(name):
    sys.path.insert(0, str(FIXTURES))
    try:
        return getattr(importlib.import_module("cli_factory"), name)()
    finally:
        sys.path.remove(str(FIXTURES))


def run_onnx(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), session


def test_optimize_searches_saves_and_exports_then_summary_reads_the_save(tmp_path):
    out = ok(dsx(tmp_path, "optimize", "cli_factory:mlp", "--input-shape", "4,16", "--max-error", "0.05",
                 "--metric", "cosine", "--formats", "int8,bf16", "--no-compile", "--dynamic-batch", "--out",
                 "opt.dsx", "--export", "opt.onnx", "--no-progress"))
    assert "dsx.optimize on cpu: cosine <= 0.05" in out
    report = out[out.index("dsx.optimize on cpu"):].splitlines()
    assert [ln.split()[0] for ln in report[3:6]] == ["original", "int8", "bf16"]
    assert "saved: opt.dsx" in out and "exported: onnx -> opt.onnx (max abs" in out
    x = torch.randn(3, 16)
    got, session = run_onnx(tmp_path / "opt.onnx", x)
    assert isinstance(session.get_inputs()[0].shape[0], str)
    with torch.no_grad():
        ref = fixture("mlp").eval()(x)
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.95

    out = ok(dsx(tmp_path, "summary", "opt.dsx"))
    assert "tensors:" in out and "(parameters and persistent buffers)" in out


def test_optimize_prunes_sparsifies_quantizes_and_exports(tmp_path):
    out = ok(dsx(tmp_path, "optimize", "cli_factory:wide_mlp", "--input-shape", "8,64", "--prune", "0.3",
                 "--sparsify", "2:4", "--quantize", "int8_static", "--calibration", "cli_factory:calibration",
                 "--no-compile", "--out", "q.dsx", "--export", "q.onnx", "--no-progress"))
    steps = ("prune      prune", "sparsify   prune     pattern=2:4", "quantize   compress  format={format=int8_static")
    assert all(step in out for step in steps), out
    assert "exported: onnx -> q.onnx" in out
    onnx = pytest.importorskip("onnx")
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    out = ok(dsx(tmp_path, "summary", "q.dsx"))
    assert "int8" in out and "quantize" in out


def test_export_resnet_to_pt2_then_the_pt2_to_onnx(tmp_path):
    out = ok(dsx(tmp_path, "export", "cli_factory:resnet", "net.pt2", "--input-shape", "2,3,16,16", "--no-progress"))
    assert out.startswith("pt2 -> net.pt2 (max abs")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = fixture("resnet").eval()(x)
    torch.testing.assert_close(torch.export.load(tmp_path / "net.pt2").module()(x), ref)

    out = ok(dsx(tmp_path, "export", "net.pt2", "net.onnx", "--input-shape", "2,3,16,16", "--opset", "18",
                 "--no-progress"))
    assert out.startswith("onnx -> net.onnx (max abs") and "not verified" not in out
    torch.testing.assert_close(run_onnx(tmp_path / "net.onnx", x)[0], ref, rtol=1e-4, atol=1e-5)
    out = ok(dsx(tmp_path, "export", "cli_factory:mlp", "fast.onnx", "--input-shape", "2,16", "--no-verify",
                 "--no-progress"))
    assert "not verified" in out and (tmp_path / "fast.onnx").is_file()


def test_recipe_file_with_inputs_factory(tmp_path):
    (tmp_path / "recipe.yaml").write_text("transforms:\n  - fuse:\n      passes: [remove_dropout]\n"
                                          "      dynamic_batch: true\n")
    out = ok(dsx(tmp_path, "optimize", "cli_factory:mlp", "--inputs", "cli_factory:mlp_inputs", "--recipe",
                 "recipe.yaml", "--export", "r.onnx", "--no-progress"))
    assert "passes=[remove_dropout], dynamic_batch=True" in out and "fusions={remove_dropout=1}" in out
    _, session = run_onnx(tmp_path / "r.onnx", torch.randn(5, 16))
    assert isinstance(session.get_inputs()[0].shape[0], str)


def test_bench_prints_its_table(tmp_path):
    out = ok(dsx(tmp_path, "bench", "cli_factory:mlp", "--input-shape", "4,16", "--iters", "2"))
    lines = out.splitlines()
    assert lines[0].startswith("device: cpu") and lines[1].split() == ["runtime", "ms", "vs", "eager", "max", "abs",
                                                                     "err"]
    rows = {ln.split("  ")[0]: ln.split() for ln in lines[3:]}
    assert list(rows) == ["eager", "dsx.optimize", "torch.compile", "onnxruntime fp32"]
    assert all(float(r[-1]) < 1e-4 for name, r in rows.items() if name != "eager")


def test_plot_needs_matplotlib(tmp_path):
    if importlib.util.find_spec("matplotlib"):
        pytest.skip("matplotlib is installed; the error path cannot be shown")
    res = dsx(tmp_path, "bench", "cli_factory:mlp", "--input-shape", "4,16", "--plot", "b.png")
    assert res.returncode == 1 and res.stderr.strip() == (
        "dsx: error: --plot needs matplotlib: pip install matplotlib (--debug shows the traceback)")


@pytest.mark.parametrize("args,code,message", [
    (["optimize", "nope:missing", "--input-shape", "2,3"], 1,
     "dsx: error: MODEL 'nope:missing': cannot import module 'nope'"),
    (["optimize", "cli_factory:mlp", "--input-shape", "2,x"], 2, "argument --input-shape: bad shape '2,x'"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--passes", "remove_dropout,nope"], 1,
     "dsx: error: passes: unknown pass 'nope'"),
    (["export", "cli_factory:mlp", "out.onnx"], 1, "dsx: error: the model needs example inputs"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--recipe", "r.yaml", "--max-error", "0.1"], 2,
     "--max-error does not apply to --recipe"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--max-error", "-1"], 2,
     "argument --max-error: expected a finite number >= 0, got '-1'"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--budget-s", "0"], 2,
     "argument --budget-s: expected a positive number, got '0'"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--metric", "l2"], 2,
     "argument --metric: invalid choice"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--formats", "int9"], 1,
     "dsx: error: formats: unknown format 'int9'"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--recipe", "r.yaml", "--quantize", "int8"], 2,
     "--quantize does not apply to --recipe"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--quantize", "int9"], 1,
     "dsx: error: quantize: config: unknown quantization format 'int9'"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--prune", "1.5"], 2,
     "argument --prune: expected a fraction in [0, 1), got '1.5'"),
    (["optimize", "cli_factory:mlp", "--input-shape", "4,16", "--structured"], 2, "--structured needs --prune"),
    (["summary", "missing.dsx"], 1, "dsx: error: summary: missing.dsx is not a directory written by dsx.save"),
])
def test_errors_are_one_line_with_an_exit_code(tmp_path, args, code, message):
    res = dsx(tmp_path, *args, "--no-progress")
    assert res.returncode == code
    assert "Traceback" not in res.stderr
    assert message in res.stderr.strip().splitlines()[-1]
    if code == 1:
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_debug_shows_the_traceback(tmp_path):
    res = dsx(tmp_path, "--debug", "optimize", "nope:missing", "--input-shape", "2,3")
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr and "ModuleNotFoundError" in res.stderr
    with pytest.raises(ValueError, match="cannot import module 'nope'"):
        main(["optimize", "nope:missing", "--input-shape", "2,3", "--debug"])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_optimize_a_hugging_face_folder_end_to_end(arch, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=100))
    model.save_pretrained(tmp_path / "folder")
    out = ok(dsx(tmp_path, "optimize", "./folder", "--quantize", "int8", "--no-compile", "--export", "out.onnx",
                 "--out", "./folder-int8", "--no-progress"))
    assert "saved: folder-int8" in out and "exported: onnx -> out.onnx" in out
    assert {"config.json", "model.safetensors", "dsx.json"} <= {p.name for p in (tmp_path / "folder-int8").iterdir()}
    again = dsx_api.from_pretrained(tmp_path / "folder-int8")
    want = dsx_api.quantize(dsx_api.from_pretrained(tmp_path / "folder"), "int8", progress=False)
    ids = torch.randint(0, 100, (2, 8))
    assert torch.equal(again(ids)[0], want(ids)[0])
