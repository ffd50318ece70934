"""``dsx.sparsify(model, "2:4", accelerate=True)`` on a GPU of compute capability 8.0+: the linears become
``SemiSparseLinear`` holding a ``torch.sparse.SparseSemiStructuredTensor``, inference goes through it, and the outputs
match the masked dense computation in float64 within fp16 / bf16 rounding.

Under ``DSX_CUDA_TESTS_DEVICE=cpu`` the semi-structured kernels are emulated (the "compressed" weight is a dense copy,
as in tests/compress/test_sparsity.py), which checks this file's logic; the kernels themselves need the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrize import type_before_parametrizations

import dsx
from dsx.compress import sparsity as sp
from dsx.compress.sparsity import SemiSparseLinear, check_2to4
from tests.cuda.cuda_testing import DEVICE, MLP, ON_CUDA, TOL, needs_device, rel_err, require_capability, require_cuda

pytestmark = needs_device

SPARSE_CAPABILITY = (8, 0)


@pytest.fixture
def kernels(monkeypatch):
    """"real" on a CUDA GPU of capability 8.0+; on the CPU "emulated": the compressed weight is a dense copy."""
    if ON_CUDA:
        require_capability(SPARSE_CAPABILITY, "2:4 semi-structured sparse kernels")
        return "real"
    monkeypatch.setattr(sp, "accelerate_reason", lambda module: None)
    monkeypatch.setattr(sp, "to_sparse_semi_structured", lambda w: w.clone())
    return "emulated"


def _masked_dense_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's output in float64 with the masked (dense) weights that ``module.weight`` reads."""
    with torch.no_grad():
        up, down = model.up, model.down
        h = F.gelu(F.linear(x.double(), up.weight.double(), up.bias.double()))
        return F.linear(h.to(x.dtype).double(), down.weight.double(), down.bias.double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_accelerated_linears_run_the_semi_structured_kernels(kernels, dtype, monkeypatch):
    model = MLP().to(DEVICE, dtype).eval()
    x = torch.randn(4, 8, 128).to(DEVICE, dtype)
    sparse = dsx.sparsify(model, "2:4", accelerate=True, example_inputs=x)
    info = dsx.history(sparse)[-1]["info"]
    assert sorted(info["accelerated"]) == ["down", "up"] and info["sparsity"] == 0.5
    layers = [sparse.up, sparse.down]
    for m in layers:
        assert type_before_parametrizations(m) is SemiSparseLinear and check_2to4(m.weight)
        assert m.weight.dtype == dtype and m.weight.device.type == DEVICE.type
        if kernels == "real":
            assert isinstance(sp.compressed(m), torch.sparse.SparseSemiStructuredTensor)

    calls = []
    monkeypatch.setattr(sp, "compressed", lambda m, real=sp.compressed: calls.append(m) or real(m))
    with torch.no_grad():
        out = sparse(x)
    assert calls == layers, "inference did not go through the compressed weights"
    assert out.dtype == dtype and out.shape == (4, 8, 64)
    err = rel_err(out, _masked_dense_reference(sparse, x))
    assert err < TOL[dtype], f"relative error {err:.3g} against the masked dense computation"


def test_fp32_layers_are_refused_with_the_reason():
    require_cuda("the dtype check of the 2:4 kernels")
    require_capability(SPARSE_CAPABILITY, "2:4 semi-structured sparse kernels")
    model = MLP().to(DEVICE).eval()
    with pytest.raises(ValueError, match="2:4 sparse kernels take float16 / bfloat16 weights"):
        dsx.sparsify(model, "2:4", accelerate=True)
    sparse = dsx.sparsify(model, "2:4")  # accelerate=None: masked dense where the kernels do not apply
    assert dsx.history(sparse)[-1]["info"]["accelerated"] == []
    assert type_before_parametrizations(sparse.up) is nn.Linear and check_2to4(sparse.up.weight)
