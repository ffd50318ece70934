"""Every ``torch.ops.dsx`` op on the test device (CUDA: its Triton kernel through ``wrap_triton``), eager and under
``torch.compile(fullgraph=True)``, in each dtype it takes, against its reference in float64 (or, for the quantizers
and the W8A8 GEMM, their exact fp32 / integer definitions); fp32 gradients against float64 autograd; and the direct
Triton launches (on the CPU: in the interpreter) against the same references."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import pytest
import torch

import dsx.kernels
from dsx.kernels import add_layer_norm, add_rms_norm, bias_act, gated_act, int4_mm, int8_mm
from dsx.kernels import quantize_fp8, quantize_per_token, softmax
from tests.cuda.cuda_testing import (DEVICE, DTYPES, GRAD_TOL, ON_CUDA, TOL,
                                     needs_device, rel_err, require_capability)

pytestmark = needs_device

ROWS, COLS = 6, 80  # a row width that is not a power of two: the row kernels mask their last block
M, K, N, GROUP = 5, 128, 48, 64


def _randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype).to(DEVICE)


def _causal_keep(q: int, n: int) -> torch.Tensor:
    """[1, 1, q, n] True where row i keeps column j (j < n // 2 + i): no row is fully masked."""
    return (torch.arange(n)[None, :] < n // 2 + torch.arange(q)[:, None])[None, None].to(DEVICE)


def _int8(*shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8).to(DEVICE)


def _int4_weight() -> tuple:
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scale = torch.rand(N, K // GROUP) * 0.05 + 0.01
    zero = torch.rand(N, K // GROUP) * 4 + 6  # fractional zero points, as HQQ gives
    return int4_mm.pack_int4(q).to(DEVICE), scale.to(DEVICE), zero.to(DEVICE)


def _with_absmax(x: torch.Tensor) -> tuple:
    """``(x, absmax)`` with per-row maxima from half to 1.5 times the rows' own: codes clamp on the first rows."""
    scale = torch.linspace(0.5, 1.5, x.shape[0], device=DEVICE)[:, None]
    return x, x.float().abs().amax(-1, keepdim=True) * scale


def _float_compare(out: Any, ref: Any, dtype: torch.dtype) -> None:
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.device.type == DEVICE.type and o.dtype == dtype and o.shape == r.shape
        err = rel_err(o, r)
        assert err < TOL[dtype], f"relative error {err:.3g} >= {TOL[dtype]} ({dtype})"


def _int8_compare(out: Any, ref: Any, dtype: torch.dtype) -> None:
    """Per-row scales equal up to fp32 rounding; int8 codes equal but for rare off-by-one ties."""
    (q, scale), (rq, rs) = out, ref
    assert q.dtype == torch.int8 and q.shape == rq.shape and scale.dtype == torch.float32
    assert rel_err(scale, rs) < 1e-6
    diff = (q.cpu().int() - rq.cpu().int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, f"{int((diff > 0).sum())} codes differ"


def _fp8_compare(out: Any, ref: Any, dtype: torch.dtype) -> None:
    """Per-row scales equal up to fp32 rounding; e4m3 codes within one step of the reference's (round to nearest)."""
    (q, scale), (rq, rs) = out, ref
    assert q.dtype == torch.float8_e4m3fn and q.shape == rq.shape and scale.dtype == torch.float32
    assert rel_err(scale, rs) < 1e-6
    got, want = q.cpu().float(), rq.cpu().float()
    step = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0 ** -6))) - 3)  # e4m3: 3 mantissa bits
    assert ((got - want).abs() <= step).all()
    assert (got != want).float().mean() <= 0.01


@dataclass
class OpCase:
    """One call of an op: ``args(dtype)`` builds its arguments on DEVICE, ``reference`` takes the same arguments
    (those at ``promote`` cast to float64, or all floating ones when None), ``launcher`` is the direct Triton
    launch; ``grads`` are the argument positions that get gradients (fp32 backward check)."""

    id: str
    op: str
    args: Callable[[torch.dtype], tuple]
    reference: Callable[..., Any]
    launcher: Optional[Callable[..., Any]]
    compare: Callable[[Any, Any, torch.dtype], None] = _float_compare
    promote: Optional[Sequence[int]] = None
    grads: Sequence[int] = ()
    reference_on_cpu: bool = False

    def call(self, args: tuple) -> Any:
        return getattr(torch.ops.dsx, self.op)(*args)

    def reference_args(self, args: tuple, grad: bool = False) -> tuple:
        out = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if self.reference_on_cpu:
                    a = a.cpu()
                promote = a.is_floating_point() if self.promote is None else i in self.promote
                a = a.detach().double() if promote else a
                if grad and i in self.grads:
                    a = a.requires_grad_()
            out.append(a)
        return tuple(out)

    def expected(self, args: tuple) -> Any:
        return self.reference(*self.reference_args(args))


CASES = [
    OpCase("add_layer_norm", "add_layer_norm",
           lambda dt: (_randn(ROWS, COLS, dtype=dt), _randn(ROWS, COLS, dtype=dt), _randn(COLS, dtype=dt),
                       _randn(COLS, dtype=dt), 1e-5),
           add_layer_norm.reference, add_layer_norm.add_layer_norm_triton, grads=(0, 1, 2, 3)),
    OpCase("add_rms_norm", "add_rms_norm",
           lambda dt: (_randn(ROWS, COLS, dtype=dt), _randn(ROWS, COLS, dtype=dt), _randn(COLS, dtype=dt), 1e-6),
           add_rms_norm.reference, add_rms_norm.add_rms_norm_triton, grads=(0, 1, 2)),
    OpCase("rms_norm", "rms_norm",
           lambda dt: (_randn(2, 3, COLS, dtype=dt), _randn(COLS, dtype=dt), 1e-6),
           lambda x, w, eps: add_rms_norm.reference(x, None, w, eps)[0],
           lambda x, w, eps: add_rms_norm.add_rms_norm_triton(x, None, w, eps)[0], grads=(0, 1)),
    OpCase("bias_act", "bias_act",
           lambda dt: (_randn(ROWS, COLS, dtype=dt), _randn(COLS, dtype=dt), "gelu"),
           bias_act.reference, bias_act.bias_act_triton, grads=(0, 1)),
    OpCase("gated_act", "gated_act",
           lambda dt: (_randn(ROWS, COLS, dtype=dt), _randn(ROWS, COLS, dtype=dt), "silu"),
           gated_act.reference, gated_act.gated_act_triton, grads=(0, 1)),
    OpCase("scaled_masked_softmax-additive", "scaled_masked_softmax",
           lambda dt: (_randn(2, 3, 5, 40, dtype=dt, scale=3.0),
                       torch.zeros(1, 1, 5, 40, device=DEVICE).masked_fill(~_causal_keep(5, 40), float("-inf")).to(dt),
                       0.125),
           softmax.reference, softmax.scaled_masked_softmax_triton, grads=(0,)),
    OpCase("scaled_masked_softmax-bool", "scaled_masked_softmax",
           lambda dt: (_randn(2, 3, 5, 40, dtype=dt, scale=3.0), _causal_keep(5, 40), 0.5),
           softmax.reference, softmax.scaled_masked_softmax_triton, grads=(0,)),
    OpCase("quantize_per_token", "quantize_per_token",
           lambda dt: (_randn(ROWS, COLS, dtype=dt, scale=5.0), None),
           quantize_per_token.reference, quantize_per_token.quantize_per_token_triton,
           compare=_int8_compare, promote=(), reference_on_cpu=True),
    OpCase("quantize_per_token-absmax", "quantize_per_token",
           lambda dt: _with_absmax(_randn(ROWS, COLS, dtype=dt, scale=5.0)),
           quantize_per_token.reference, quantize_per_token.quantize_per_token_triton,
           compare=_int8_compare, promote=(), reference_on_cpu=True),
    OpCase("quantize_fp8_rowwise", "quantize_fp8_rowwise",
           lambda dt: (_randn(ROWS, COLS, dtype=dt, scale=5.0),),
           quantize_fp8.reference, quantize_fp8.quantize_fp8_rowwise_triton,
           compare=_fp8_compare, promote=(), reference_on_cpu=True),
    OpCase("quantize_fp8_rowwise-absmax", "quantize_fp8_rowwise",
           lambda dt: _with_absmax(_randn(ROWS, COLS, dtype=dt, scale=5.0)),
           quantize_fp8.reference, quantize_fp8.quantize_fp8_rowwise_triton,
           compare=_fp8_compare, promote=(), reference_on_cpu=True),
    OpCase("int8_scaled_mm", "int8_scaled_mm",
           lambda dt: (_int8(M, K), torch.rand(M, 1, device=DEVICE) * 1e-2 + 1e-3, _int8(N, K).t(),
                       torch.rand(N, device=DEVICE) * 1e-2 + 1e-3, _randn(N, dtype=dt), dt),
           int8_mm.scaled_mm_reference, int8_mm.int8_scaled_mm_triton, promote=(), grads=(4,)),
    OpCase("int8_weight_only_mm", "int8_weight_only_mm",
           lambda dt: (_randn(2, M, K, dtype=dt), _int8(N, K), torch.rand(N, device=DEVICE) * 1e-2 + 1e-3,
                       _randn(N, dtype=dt)),
           int8_mm.weight_only_reference, int8_mm.int8_weight_only_mm_triton, promote=(0, 3), grads=(0, 3)),
    OpCase("int4_weight_only_mm", "int4_weight_only_mm",
           lambda dt: (_randn(M, K, dtype=dt), *_int4_weight(), GROUP, _randn(N, dtype=dt), None, None),
           lambda x, qw, s, z, g, b, packed, scales_zeros: int4_mm.int4_reference(x, qw, s, z, g, b),
           lambda x, qw, s, z, g, b, packed, scales_zeros: int4_mm.int4_weight_only_mm_triton(x, qw, s, z, g, b),
           promote=(0, 5), grads=(0, 5)),
]
CASE_IDS = [c.id for c in CASES]


def _launcher_skip(case: OpCase, dtype: torch.dtype) -> Optional[str]:
    """Why ``case``'s direct Triton launch is not checked here, None when it is."""
    if not ON_CUDA and dtype == torch.bfloat16 and case.op in ("int8_weight_only_mm", "int4_weight_only_mm"):
        return ("the Triton interpreter's tl.dot of bfloat16 operands is wrong (tests/kernels leave bf16 out of the "
                "interpreted weight-only GEMMs too)")
    if case.op == "quantize_fp8_rowwise":
        if not ON_CUDA:
            return ("the Triton interpreter's fp8 conversion is not round-to-nearest-even (tests/kernels/"
                    "test_quantize_fp8.py checks it with its own slack)")
        if torch.cuda.get_device_capability(DEVICE) < quantize_fp8.FP8_MIN_CAPABILITY:
            return "Triton converts to float8e4nv from compute capability 8.9"
    return None


def test_every_registered_op_has_a_case():
    for module in pkgutil.iter_modules(dsx.kernels.__path__):
        importlib.import_module(f"dsx.kernels.{module.name}")
    assert set(torch.ops.dsx) == {c.op for c in CASES}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eager_op_and_triton_launch_match_reference(case, dtype):
    if case.op == "quantize_fp8_rowwise":
        require_capability(quantize_fp8.FP8_MIN_CAPABILITY, "the fp8 rowwise quantizer's Triton kernel")
    args = case.args(dtype)
    expected = case.expected(args)
    with torch.no_grad():
        case.compare(case.call(args), expected, dtype)
        if _launcher_skip(case, dtype) is None:
            case.compare(case.launcher(*args), expected, dtype)


def _compile_skip(case: OpCase, dtype: torch.dtype) -> Optional[str]:
    """Why ``case`` is left out of the compiled graph in ``dtype``, None when it is in."""
    if case.op == "quantize_fp8_rowwise" and ON_CUDA:
        if torch.cuda.get_device_capability(DEVICE) < quantize_fp8.FP8_MIN_CAPABILITY:
            return "Triton converts to float8e4nv from compute capability 8.9"
    return None



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_ops_match_reference(dtype):
    """Every op in one ``fullgraph=True`` graph (inductor launches the user-defined Triton kernels on CUDA)."""
    cases = [c for c in CASES if _compile_skip(c, dtype) is None]
    ops = [getattr(torch.ops.dsx, c.op) for c in cases]
    all_args = [c.args(dtype) for c in cases]

    def run_all(all_args):
        return [op(*args) for op, args in zip(ops, all_args)]

    torch._dynamo.reset()
    with torch.no_grad():
        outs = torch.compile(run_all, fullgraph=True)(all_args)
    for case, args, out in zip(cases, all_args, outs):
        case.compare(out, case.expected(args), dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c.grads], ids=[c.id for c in CASES if c.grads])
def test_fp32_gradients_match_float64_autograd(case):
    args = case.args(torch.float32)
    args = tuple(a.detach().clone().requires_grad_() if i in case.grads else a for i, a in enumerate(args))
    out = case.call(args)
    outs = out if isinstance(out, tuple) else (out,)
    weights = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights)).backward()

    ref_args = case.reference_args(args, grad=True)
    ref = case.reference(*ref_args)
    refs = ref if isinstance(ref, tuple) else (ref,)
    sum((r.double() * w.to(r.device)).sum() for r, w in zip(refs, weights)).backward()
    for i in case.grads:
        assert args[i].grad is not None and args[i].grad.dtype == args[i].dtype
        err = rel_err(args[i].grad, ref_args[i].grad)
        assert err < GRAD_TOL, f"gradient of argument {i}: relative error {err:.3g}"
