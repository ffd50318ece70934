"""Tests for dsx.kernels.int8_mm: the W8A8 and W8A16 Triton GEMMs (interpreted on CPU) and ops vs the references,
strided operands, M = 1, both CPU paths, invalid arguments, torch.compile and torch.export."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from dsx.kernels import int8_mm as k
from dsx.kernels import quantize_per_token
from tests.kernels.kernel_testing import DEVICE, KERNEL_TOL, TOL, make, rel_err

LAYOUTS = ["contig", "sliced", "transposed"]
# The interpreter's tl.dot multiplies bf16 blocks as raw uint16 bits, so the W8A16 kernel runs bf16 on a GPU only.
WEIGHT_ONLY_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
HALF_TOL = {torch.float32: TOL[torch.float32], torch.float16: 2e-3, torch.bfloat16: TOL[torch.bfloat16]}


def int8(rows: int, cols: int, layout: str) -> torch.Tensor:
    """A (rows, cols) int8 tensor in [-127, 127]: contiguous, a column slice or a transposed view."""
    def rand(*shape):
        return torch.randint(-127, 128, shape, dtype=torch.int8, device=DEVICE)

    if layout == "sliced":
        return rand(rows, cols + 3)[:, 1:cols + 1]
    if layout == "transposed":
        return rand(cols, rows).t()
    return rand(rows, cols)


def bias_of(kind: str, n: int):
    return None if kind == "none" else torch.randn(n, device=DEVICE).to(getattr(torch, kind))


def scales(m: int, n: int):
    return torch.rand(m, 1, device=DEVICE) / 50 + 1e-3, torch.rand(n, device=DEVICE) / 50 + 1e-3


@given(
    m=st.integers(1, 40), kk=st.sampled_from([1, 16, 50, 130]), n=st.sampled_from([1, 8, 33, 70]),
    a_layout=st.sampled_from(LAYOUTS), b_layout=st.sampled_from(LAYOUTS),
    bias=st.sampled_from(["none", "float32", "bfloat16"]), out_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_scaled_mm_triton_kernel_matches_reference(m, kk, n, a_layout, b_layout, bias, out_dtype):
    a, b = int8(m, kk, a_layout), int8(kk, n, b_layout)
    (a_scale, b_scale), bias_t = scales(m, n), bias_of(bias, n)
    c = k.int8_scaled_mm_triton(a, a_scale, b, b_scale, bias_t, out_dtype)
    assert c.dtype == out_dtype and c.shape == (m, n) and c.is_contiguous()
    ref = k.scaled_mm_reference(a, a_scale, b, b_scale, bias_t, torch.float32)
    # The int32 product is exact; the fp32 epilogue is the reference's up to fma contraction (GPU) and the bf16 cast.
    assert rel_err(c, ref.double()) < (1e-6 if out_dtype == torch.float32 else KERNEL_TOL[out_dtype])


def test_scaled_mm_triton_kernel_large_values_and_empty():
    a, b = torch.full((3, 300), -127, dtype=torch.int8, device=DEVICE), int8(300, 20, "transposed")
    a_scale, b_scale = scales(3, 20)
    c = k.int8_scaled_mm_triton(a, a_scale, b, b_scale, None, torch.float32)
    torch.testing.assert_close(c, k.scaled_mm_reference(a, a_scale, b, b_scale, None, torch.float32), rtol=1e-6, atol=0)
    empty = k.int8_scaled_mm_triton(a[:0], a_scale[:0], b, b_scale, None, torch.bfloat16)
    assert empty.shape == (0, 20) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", WEIGHT_ONLY_DTYPES)
def test_triton_kernels_single_row(dtype):
    """M = 1 (decode), where ``torch._int_mm`` refuses on CUDA."""
    a, w, x = int8(1, 96, "contig"), int8(40, 96, "contig"), torch.randn(1, 96, device=DEVICE).to(dtype)
    (a_scale, w_scale), bias = scales(1, 40), torch.randn(40, device=DEVICE)
    c = k.int8_scaled_mm_triton(a, a_scale, w.t(), w_scale, bias, dtype)
    assert rel_err(c, k.scaled_mm_reference(a, a_scale, w.t(), w_scale, bias, torch.float32).double()) < 1e-2
    y = k.int8_weight_only_mm_triton(x, w, w_scale, bias)
    assert rel_err(y, k.weight_only_reference(x.double(), w, w_scale, bias.double())) < HALF_TOL[dtype]


def test_configs_pruned_by_m_bucket(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert {c.kwargs["BLOCK_M"] for c in k.prune_gemm_configs(k.GEMM_CONFIGS, {"M": 3})} == {16}
    assert {c.kwargs["BLOCK_M"] for c in k.prune_gemm_configs(k.GEMM_CONFIGS, {"M": 33})} == {16, 32, 64}
    assert k.prune_gemm_configs(k.GEMM_CONFIGS, {"M": 4096}) == k.GEMM_CONFIGS
    symbolic_m = ShapeEnv().create_unbacked_symint()  # torch.compile tracing with a dynamic M: nothing specialized
    assert k.prune_gemm_configs(k.GEMM_CONFIGS, {"M": symbolic_m}) == k.GEMM_CONFIGS
    assert k.m_bucket(symbolic_m) is symbolic_m and k.m_bucket(5) == 8 and k.m_bucket(1) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(k.prune_gemm_configs(k.GEMM_CONFIGS, {"M": 4096})) == 1


def test_scaled_mm_reference_is_the_definition():
    a, b = torch.randint(-127, 128, (4, 9), dtype=torch.int8), torch.randint(-127, 128, (9, 5), dtype=torch.int8)
    a_scale, b_scale = (t.cpu() for t in scales(4, 5))
    bias = torch.randn(5, dtype=torch.float64)
    want = (a.long() @ b.long()).double() * a_scale.double() * b_scale.double() + bias
    assert rel_err(k.scaled_mm_reference(a, a_scale, b, b_scale, bias, torch.float32), want) < 1e-6


@given(
    m=st.integers(1, 40), kk=st.sampled_from([1, 16, 50, 130]), n=st.sampled_from([1, 8, 33, 70]),
    b_layout=st.sampled_from(LAYOUTS), bias=st.sampled_from(["none", "float32", "bfloat16"]),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_scaled_mm_op_cpu_is_exact(m, kk, n, b_layout, bias, out_dtype):
    a, b = int8(m, kk, "contig").cpu(), int8(kk, n, b_layout).cpu()
    (a_scale, b_scale), bias_t = scales(m, n), bias_of(bias, n)
    a_scale, b_scale, bias_t = a_scale.cpu(), b_scale.cpu(), None if bias_t is None else bias_t.cpu()
    c = k.int8_scaled_mm(a, a_scale, b, b_scale, bias_t, out_dtype)
    assert c.dtype == out_dtype and c.shape == (m, n)
    assert torch.equal(c, k.scaled_mm_reference(a, a_scale, b, b_scale, bias_t, out_dtype))


def test_scaled_mm_op_cpu_chunks_and_broadcast_operands(monkeypatch):
    monkeypatch.setattr(quantize_per_token, "CHUNK_ELEMS", 64)  # 3 rows of 20 per chunk, partial last chunk
    a = torch.randint(-127, 128, (1, 50), dtype=torch.int8).expand(7, 50)  # stride-0 rows: torch._int_mm gets these
    b = torch.randint(-127, 128, (50, 1), dtype=torch.int8).expand(50, 20)  # wrong on the CPU unless copied
    (a_scale, b_scale), bias = scales(7, 20), torch.randn(20)
    c = k.int8_scaled_mm(a, a_scale.cpu(), b, b_scale.cpu(), bias, torch.float32)
    assert torch.equal(c, k.scaled_mm_reference(a, a_scale.cpu(), b, b_scale.cpu(), bias, torch.float32))
    assert k.int8_scaled_mm(a[:0], a_scale[:0].cpu(), b, b_scale.cpu()).shape == (0, 20)


def test_scaled_mm_invalid_arguments():
    a, b = torch.randint(-127, 128, (4, 8), dtype=torch.int8), torch.randint(-127, 128, (8, 3), dtype=torch.int8)
    a_scale, b_scale = torch.rand(4, 1), torch.rand(3)
    with pytest.raises(ValueError, match="2-D int8 with the same K"):
        k.int8_scaled_mm(a.float(), a_scale, b, b_scale)
    with pytest.raises(ValueError, match="2-D int8 with the same K"):
        k.int8_scaled_mm(a, a_scale, b[:7], b_scale)
    with pytest.raises(ValueError, match=r"a_scale must be float32 \[4, 1\]"):
        k.int8_scaled_mm(a, a_scale[:, 0], b, b_scale)
    with pytest.raises(ValueError, match=r"b_scale must be float32 \[3\]"):
        k.int8_scaled_mm(a, a_scale, b, b_scale.to(torch.bfloat16))
    with pytest.raises(ValueError, match="bias must be"):
        k.int8_scaled_mm(a, a_scale, b, b_scale, torch.randn(4))
    with pytest.raises(ValueError, match="out_dtype"):
        k.int8_scaled_mm_triton(a, a_scale, b, b_scale, None, torch.int32)


@given(
    m=st.integers(1, 40), kk=st.sampled_from([1, 16, 50, 130]), n=st.sampled_from([1, 8, 33, 70]),
    dtype=st.sampled_from(WEIGHT_ONLY_DTYPES), x_layout=st.sampled_from(LAYOUTS), w_layout=st.sampled_from(LAYOUTS),
    bias=st.sampled_from(["none", "float32", "bfloat16"]),
)
def test_weight_only_triton_kernel_matches_reference(m, kk, n, dtype, x_layout, w_layout, bias):
    x, w = make(m, kk, dtype, x_layout), int8(n, kk, w_layout)
    w_scale, bias_t = scales(1, n)[1], bias_of(bias, n)
    y = k.int8_weight_only_mm_triton(x, w, w_scale, bias_t)
    assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
    ref = k.weight_only_reference(x.double(), w, w_scale, None if bias_t is None else bias_t.double())
    assert rel_err(y, ref) < HALF_TOL[dtype]


def test_weight_only_triton_kernel_3d_and_empty():
    x, w = torch.randn(2, 5, 3, 70, device=DEVICE).transpose(1, 2), int8(24, 70, "contig")
    w_scale = scales(1, 24)[1]
    y = k.int8_weight_only_mm_triton(x, w, w_scale, None)
    assert y.shape == (2, 3, 5, 24)
    assert rel_err(y, k.weight_only_reference(x.double(), w, w_scale, None)) < TOL[torch.float32]
    assert k.int8_weight_only_mm_triton(x[:0], w, w_scale, None).shape == (0, 3, 5, 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,kk", [(1, 48), (5, 48), (60, 48), (5, 50)])
def test_weight_only_op_cpu_paths(dtype, m, kk, monkeypatch):
    """``_weight_int8pack_mm`` (M = 1 for fp32, M = 1 and 5 for bf16), dequantize + ``F.linear`` by chunks of 5
    output features (the other cases with M <= K) or whole (M = 60 > K)."""
    monkeypatch.setattr(quantize_per_token, "CHUNK_ELEMS", 5 * kk)
    x = torch.randn(m, kk + 2)[:, 1:kk + 1].to(dtype)
    w, w_scale, bias = torch.randint(-127, 128, (40, kk), dtype=torch.int8), torch.rand(40) / 50, torch.randn(40)
    for b in (None, bias, bias.to(torch.bfloat16)):
        y = k.int8_weight_only_mm(x, w, w_scale, b)
        assert y.dtype == dtype and y.shape == (m, 40)
        ref = k.weight_only_reference(x.double(), w, w_scale, None if b is None else b.double())
        assert rel_err(y, ref) < HALF_TOL[dtype]


def test_weight_only_op_3d_strided_weight_and_float64():
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    w = torch.randint(-127, 128, (64, 10), dtype=torch.int8).t()
    w_scale = torch.rand(10) / 50
    y = k.int8_weight_only_mm(x, w, w_scale)
    assert y.shape == (2, 3, 10) and rel_err(y, k.weight_only_reference(x.double(), w, w_scale, None)) < 1e-2
    x64 = torch.randn(3, 64, dtype=torch.float64)
    assert rel_err(k.int8_weight_only_mm(x64, w, w_scale), k.weight_only_reference(x64, w, w_scale, None)) < 1e-6


def test_weight_only_invalid_arguments():
    x, w, w_scale = torch.randn(4, 8), torch.randint(-127, 128, (3, 8), dtype=torch.int8), torch.rand(3)
    with pytest.raises(ValueError, match="x must be a floating"):
        k.int8_weight_only_mm(x.long(), w, w_scale)
    with pytest.raises(ValueError, match=r"w must be int8 \[N, 8\]"):
        k.int8_weight_only_mm(x, w[:, :7], w_scale)
    with pytest.raises(ValueError, match=r"w must be int8"):
        k.int8_weight_only_mm(x, w.float(), w_scale)
    with pytest.raises(ValueError, match=r"w_scale must be float32 \[3\]"):
        k.int8_weight_only_mm_triton(x, w, w_scale[:2], None)
    with pytest.raises(ValueError, match="bias must be"):
        k.int8_weight_only_mm(x, w, w_scale, torch.randn(8))


def test_gradients_flow_to_x_and_bias():
    w, w_scale = torch.randint(-127, 128, (6, 16), dtype=torch.int8), torch.rand(6) / 50
    x, bias = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True), torch.randn(6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: k.int8_weight_only_mm(x, w, w_scale, bias.double()), (x,))
    k.int8_weight_only_mm(x.float(), w, w_scale, bias).pow(2).sum().backward()
    x2, b2 = x.detach().float().requires_grad_(), bias.detach().requires_grad_()
    torch.nn.functional.linear(x2, w.float() * w_scale[:, None], b2).pow(2).sum().backward()
    assert rel_err(bias.grad, b2.grad.double()) < 1e-5 and bias.grad.dtype == torch.float32
    a, a_scale, bias = torch.randint(-127, 128, (4, 16), dtype=torch.int8), torch.rand(4, 1), torch.randn(6).bfloat16()
    bias.requires_grad_()
    grad = torch.randn(4, 6)
    k.int8_scaled_mm(a, a_scale, w.t(), w_scale, bias, torch.float32).backward(grad)
    assert bias.grad.dtype == torch.bfloat16 and rel_err(bias.grad, grad.sum(0).double()) < 1e-2


class Int8Linear(torch.nn.Module):
    """Both ops on one int8 weight: dynamic W8A8 plus W8A16."""

    def __init__(self, n: int = 24, kk: int = 48):
        super().__init__()
        self.register_buffer("w", torch.randint(-127, 128, (n, kk), dtype=torch.int8))
        self.register_buffer("w_scale", torch.rand(n) / 50)
        self.bias = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        q, scale = quantize_per_token.quantize_per_token(x.reshape(-1, x.shape[-1]))
        w8a8 = k.int8_scaled_mm(q, scale, self.w.t(), self.w_scale, self.bias, x.dtype)
        return w8a8.view(*x.shape[:-1], -1) + k.int8_weight_only_mm(x, self.w, self.w_scale, self.bias)


def test_torch_compile_fullgraph():
    model, x = Int8Linear(), torch.randn(2, 5, 48)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("int8_dot", [True, False])
def test_compiled_cpu_product_without_int8_dot_is_an_fp32_matmul(int8_dot, monkeypatch):
    """Without VNNI / AMX ``torch._int_mm`` is a scalar loop: compiled graphs multiply the codes in fp32 instead."""
    monkeypatch.setattr(k, "has_int8_dot", lambda: int8_dot)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or real(a, b))
    a, b = torch.randint(-127, 128, (5, 64), dtype=torch.int8), torch.randint(-127, 128, (64, 24), dtype=torch.int8)
    (a_scale, b_scale), bias = scales(5, 24), torch.randn(24)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the branch a compiled graph traces
    out = k._scaled_mm_aten(a, a_scale.cpu(), b, b_scale.cpu(), bias, torch.float32)
    assert bool(calls) == int8_dot
    ref = k.scaled_mm_reference(a, a_scale.cpu(), b, b_scale.cpu(), bias, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_torch_compile_weight_only_bf16_on_the_cpu():
    """Inductor's CPU lowering of ``_weight_int8pack_mm`` refuses computed scales: compiled, the op dequantizes."""
    w = torch.randint(-127, 128, (32, 48), dtype=torch.int8)
    scale, x = torch.rand(32) / 100 + 1e-3, torch.randn(4, 48).bfloat16()
    torch._dynamo.reset()
    out = torch.compile(k.int8_weight_only_mm, fullgraph=True)(x, w, scale, None)
    ref = x.double() @ (w.double() * scale.double()[:, None]).t()
    assert out.dtype == torch.bfloat16 and ((out.double() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_export_keeps_ops():
    model, x = Int8Linear(), torch.randn(2, 5, 48)
    ep = torch.export.export(model, (x,), strict=False)
    targets = {n.target for n in ep.graph.nodes}
    assert {torch.ops.dsx.int8_scaled_mm.default, torch.ops.dsx.int8_weight_only_mm.default} <= targets
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


def test_fp32_gemms_drop_the_tiles_that_spill_registers(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tiles = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in cs}  # noqa: E731
    every = k.prune_gemm_configs(k.GEMM_CONFIGS, {"M": 4096}, IEEE=False)
    fp32 = k.prune_gemm_configs(k.GEMM_CONFIGS, {"M": 4096}, IEEE=True)
    assert (256, 128) in tiles(every) and max(m * n for m, n in tiles(fp32)) <= k.IEEE_MAX_TILE
    assert tiles(k.prune_gemm_configs(k.GEMM_CONFIGS, {"M": 1})) == {(16, 32), (16, 64), (16, 128)}
