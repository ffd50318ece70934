import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch

from dsx.graph.backend import DsxBackend, compile_backend
from dsx.models import TinyGPT, TinyResNet, randomize_batchnorm
from tests.hf_models import tiny_hf


def test_entry_point_is_registered():
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("dsx") == "dsx.graph.backend:dsx_backend"


def test_backend_by_name_without_importing_dsx():
    script = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1), torch.nn.GELU()).eval()
        x = torch.randn(4, 8)
        assert "dsx" not in sys.modules
        out = torch.compile(m, backend="dsx")(x)
        torch.testing.assert_close(out, m(x))
        from dsx.graph.backend import dsx_backend
        print(dsx_backend.reports)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "remove_dropout" in res.stdout


def _models():
    torch.manual_seed(0)
    gpt = TinyGPT(vocab=64, dim=32, layers=2, heads=4, max_len=16, dropout=0.0)
    cnn = randomize_batchnorm(TinyResNet(width=8))
    yield "tiny-gpt", gpt, (torch.randint(0, 64, (2, 16)),), {}
    yield "tiny-resnet", cnn, (torch.randn(2, 3, 16, 16),), {}
    for name in ("bert", "gpt2", "llama", "vit"):
        m, kw = tiny_hf(name)
        yield name, m, (), kw


MODELS = list(_models())


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name,model,args,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_inference_matches_eager(name, model, args, kwargs):
    torch._dynamo.reset()
    backend = compile_backend(passes="all")
    model.eval()
    with torch.no_grad():
        ref = _first(model(*args, **kwargs))
        out = _first(torch.compile(model, backend=backend)(*args, **kwargs))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    fired = {k: v for r in backend.reports for k, v in r.get("fusions", {}).items() if v}
    assert fired, f"no dsx pass fired inside the backend for {name}: {backend.reports}"


@pytest.mark.parametrize("name,model,args,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_training_gradients_match_eager(name, model, args, kwargs):
    torch._dynamo.reset()
    model.train() if name.startswith("tiny") else model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        for p in params:
            p.grad = None
        out = _first(fn(*args, **kwargs))
        (out.float() ** 2).mean().backward()
        return out.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref_out, ref_grads = grads(model)
    model.load_state_dict(state)
    out, got = grads(torch.compile(model, backend=compile_backend(passes="all")))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for g, r in zip(got, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_default_instance_and_bad_pass_name():
    assert isinstance(compile_backend(), DsxBackend)
    with pytest.raises(ValueError, match="unknown pass"):
        compile_backend(passes=["fuse_everything"])


def test_new_shapes_stay_correct_and_dynamic_graphs_get_the_passes_too():
    torch.manual_seed(0)
    m = TinyGPT(vocab=64, dim=32, layers=1, heads=4, max_len=32, dropout=0.0).eval()
    shapes = ((2, 16), (3, 16), (4, 8))
    for dynamic in (None, False):
        torch._dynamo.reset()
        backend = compile_backend()
        f = torch.compile(m, backend=backend, dynamic=dynamic)
        with torch.no_grad():
            for b, t in shapes:
                x = torch.randint(0, 64, (b, t))
                torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-4)
        reports = list(backend.reports)
        assert reports and all(r["fusions"]["attention_to_sdpa"] == 1 for r in reports), reports
        # dynamic=None: the first graph is static, later shapes compile a symbolic graph (rewritten all the same)
        assert any(r.get("dynamic") for r in reports) == (dynamic is None), reports
