"""Tests for dsx.kernels.int8_linear_cpu: one fbgemm pack per weight (rebuilt on change, dropped with the weight), the
op equals the eager kernels it wraps, and compiled graphs (not exports) call it where the CPU lacks int8 dot products.
"""

import gc

import pytest
import torch

from dsx.kernels import int8_linear_cpu as L
from dsx.kernels.int8_fbgemm import fbgemm_available
from dsx.kernels.quantize_per_token import quantize_per_token
from dsx.kernels.int8_mm import scaled_mm_reference
from dsx.quant.linear import Int8Linear, Int8W7Linear

pytestmark = pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no fbgemm")


def weight(n: int = 24, k: int = 64, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 100 + k)
    return (torch.randint(-qmax, qmax + 1, (n, k), dtype=torch.int8, generator=g),
            torch.rand(n, generator=g) / 50 + 1e-3)


def test_one_pack_per_weight_rebuilt_on_change_and_dropped_with_the_weight():
    w, s = weight()
    packed = L.fbgemm_pack(w, s)
    assert L.fbgemm_pack(w, s) is packed
    w.add_(0)  # an in-place change (the version moves) repacks
    assert L.fbgemm_pack(w, s) is not packed
    packed = L.fbgemm_pack(w, s)
    s.mul_(2)
    assert L.fbgemm_pack(w, s) is not packed
    assert L.fbgemm_pack(w, s.clone()) is not L.fbgemm_pack(w, s)  # other scale tensors: another pack
    assert L.fbgemm_pack(w.clone(), s) is not L.fbgemm_pack(w, s)
    key = id(w)
    assert key in L._PACKS
    del w, packed
    gc.collect()
    assert key not in L._PACKS


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("seven_bit", [False, True])
def test_the_op_is_the_exact_integer_product_of_per_token_codes(m, seven_bit):
    w, s = weight(qmax=63 if seven_bit else 127)
    x, bias = torch.randn(m, 64), torch.randn(24)
    out = torch.ops.dsx.int8_linear_cpu(x, w, s, bias, None, torch.float32, seven_bit)
    assert torch.equal(out, L.int8_linear_cpu(x, w, s, bias, None, torch.float32, seven_bit))
    xq, xs = quantize_per_token(x)
    ref = scaled_mm_reference(xq, xs, w.t(), s, bias, torch.float32)
    if m == 1 and seven_bit:  # one row goes in as it is: fbgemm rounds it over its own 8-bit range
        assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    else:
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_absmax_dtype_and_a_one_column_input_take_the_aten_kernels():
    w, s = weight(k=1, qmax=63)
    x = torch.randn(3, 1)
    xq, xs = quantize_per_token(x)
    out = L.int8_linear_cpu(x, w, s, None, None, torch.bfloat16, True)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), scaled_mm_reference(xq, xs, w.t(), s, None, torch.float32), atol=1e-2)
    w, s = weight()
    x, absmax = torch.randn(2, 64), torch.full((2, 1), 10.0)
    xq, xs = quantize_per_token(x, absmax)
    assert torch.allclose(L.int8_linear_cpu(x, w, s, None, absmax),
                          scaled_mm_reference(xq, xs, w.t(), s, None, torch.float32), rtol=1e-5, atol=1e-5)


def test_the_fake_kernel_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.dsx.int8_linear_cpu(torch.empty(7, 64), torch.empty(24, 64, dtype=torch.int8),
                                            torch.empty(24), None, None, torch.bfloat16, False)
    assert out.shape == (7, 24) and out.dtype == torch.bfloat16


def targets(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set]:
    """The compiled layer's output on ``x`` and the names of its graph's ops (``dsx.int8_linear_cpu``, ...)."""
    seen = set()

    def backend(gm, inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(layer, backend=backend, fullgraph=True)(x), seen


@pytest.mark.parametrize("cls", [Int8Linear, Int8W7Linear], ids=lambda c: c.format)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 64)])
def test_compiled_layers_call_the_op_without_int8_dot_products(cls, shape, monkeypatch):
    monkeypatch.setattr(L, "has_int8_dot", lambda: False)
    layer = cls.from_float(torch.nn.Linear(64, 24))
    x = torch.randn(shape)
    out, seen = targets(layer, x)
    assert "dsx.int8_linear_cpu" in seen
    with torch.no_grad():
        assert torch.equal(out, layer(x))  # the very kernels eager mode runs
    monkeypatch.setattr(L, "has_int8_dot", lambda: True)  # there inductor's torch._int_mm is the fast product
    out, seen = targets(layer, x)
    assert "dsx.int8_linear_cpu" not in seen and "dsx.int8_scaled_mm" in seen


def test_export_keeps_the_portable_ops(monkeypatch):
    monkeypatch.setattr(L, "has_int8_dot", lambda: False)
    torch._dynamo.reset()
    layer = Int8W7Linear.from_float(torch.nn.Linear(64, 24))
    program = torch.export.export(layer, (torch.randn(3, 64),), strict=False)
    ops = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.dsx.int8_scaled_mm.default in ops and torch.ops.dsx.int8_linear_cpu.default not in ops
