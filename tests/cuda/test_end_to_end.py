"""The demo models (``dsx.models``) on the test device in fp32 and bf16: ``torch.compile(model, backend="dsx")`` and
lossless ``dsx.optimize`` match eager within the lossless tolerance (``Transform.tolerance``), the backend runs its
device's default passes, and on CUDA the kernel passes put ``torch.ops.dsx`` ops into the compiled graph."""

from __future__ import annotations

import pytest
import torch

import dsx
from dsx.core.transform import Transform
from dsx.graph.backend import dsx_backend
from dsx.graph.pass_manager import KERNELS, resolve
from dsx.models import TinyGPT, TinyResNet, randomize_batchnorm
from tests.cuda.cuda_testing import DEVICE, ON_CUDA, first, needs_device, rel_err

pytestmark = needs_device

DTYPES = (torch.float32, torch.bfloat16)
KERNEL_PASSES = {p.name for p in KERNELS}
FIRES = {"tiny-gpt": {"remove_dropout", "attention_to_sdpa", "add_layer_norm", "bias_act"},
         "tiny-resnet": {"fold_batch_norm"}}
"""Passes that must rewrite something in each model's graph when the device default runs them (the GPT's residual
LayerNorms and fc bias + GELU; the ResNet's BatchNorms)."""


def _model(name: str, dtype: torch.dtype):
    """(model in eval mode, example input) on DEVICE in ``dtype``."""
    torch.manual_seed(0)
    if name == "tiny-gpt":
        model = TinyGPT(vocab=64, dim=32, layers=2, heads=4, max_len=16, dropout=0.1)
        x = torch.randint(0, 64, (2, 16))
    else:
        model = randomize_batchnorm(TinyResNet(width=8))
        x = torch.randn(2, 3, 16, 16).to(dtype)
    return model.to(DEVICE, dtype).eval(), x.to(DEVICE)


def _check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype == dtype and out.device.type == DEVICE.type
    err = rel_err(out, ref)
    assert err <= Transform.tolerance[dtype], f"relative error {err:.3g} > {Transform.tolerance[dtype]} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FIRES))
def test_dsx_backend_matches_eager_and_runs_the_device_passes(name, dtype):
    model, x = _model(name, dtype)
    torch._dynamo.reset()
    dsx_backend.reports.clear()
    with torch.no_grad():
        ref = first(model(x))
        out = first(torch.compile(model, backend="dsx")(x))
    _check_close(out, ref, dtype)
    reports = list(dsx_backend.reports)
    assert reports and all("fusions" in r for r in reports), reports
    defaults = {p.name for p in resolve(None, device=DEVICE.type)}
    assert all(set(r["fusions"]) == defaults for r in reports), reports
    fired = {k for r in reports for k, v in r["fusions"].items() if v}
    expected = FIRES[name] if ON_CUDA else FIRES[name] - KERNEL_PASSES
    assert expected <= fired, f"passes that did not fire: {sorted(expected - fired)} ({reports})"
    assert ON_CUDA or not fired & KERNEL_PASSES, "the CPU default runs no kernel pass"


@pytest.mark.parametrize("name,dtype", [("tiny-gpt", torch.bfloat16), ("tiny-resnet", torch.float32)],
                         ids=["tiny-gpt-bf16", "tiny-resnet-fp32"])
def test_lossless_optimize_matches_eager(name, dtype):
    model, x = _model(name, dtype)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = first(model(x))
    fast = dsx.optimize(model, x, progress=False)
    assert type(fast) is type(model) and fast is not model
    rows = {r.plan: r for r in dsx.report(fast).rows}
    assert rows["compile"].status == "ok", rows["compile"]
    assert rows["compile"].error is not None and rows["compile"].error <= Transform.tolerance[dtype]
    with torch.no_grad():
        _check_close(first(fast(x)), ref, dtype)
