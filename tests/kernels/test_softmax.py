"""Tests for dsx.kernels.softmax: Triton kernel (interpreted on CPU) and op vs the float64 reference with broadcast
additive / boolean masks, fully masked rows, gradients, torch.compile and torch.export."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dsx.kernels import softmax as k
from tests.kernels.kernel_testing import DEVICE, KERNEL_TOL, TOL, f64, rel_err

# masks for x [B, H, Q, N]: which of B, H, Q the mask keeps (1) or broadcasts (0); "row" is a 1-D [N] mask
MASK_SHAPES = {"none": None, "key": (1, 0, 0), "query_key": (1, 0, 1), "full": (1, 1, 1), "row": (0, 0, 0)}


def make_mask(x: torch.Tensor, kind: str, boolean: bool) -> torch.Tensor | None:
    """A mask broadcastable to 4-D ``x``: [B,1,1,N], [B,1,Q,N], [B,H,Q,N] or [N]; keeps at least the first key."""
    dims = MASK_SHAPES[kind]
    if dims is None:
        return None
    b, h, q, n = x.shape
    shape = [s if keep else 1 for s, keep in zip((b, h, q), dims)] + [n]
    shape = shape[-1:] if kind == "row" else shape
    if boolean:
        mask = torch.rand(shape, device=x.device) > 0.4
        mask[..., 0] = True
        return mask
    mask = torch.where(torch.rand(shape, device=x.device) > 0.4, 0.0, -1e4) + torch.randn(shape, device=x.device)
    mask[..., 0] = torch.randn(mask[..., 0].shape, device=x.device)
    return mask


@given(
    b=st.integers(1, 2), h=st.integers(1, 3), q=st.integers(1, 5), n=st.sampled_from([1, 3, 17, 129, 257]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), layout=st.sampled_from(["contig", "transposed", "sliced"]),
    mask_kind=st.sampled_from(list(MASK_SHAPES)), boolean=st.booleans(), scale=st.sampled_from([1.0, 0.125, 3.0]),
)
def test_triton_kernel_matches_reference(b, h, q, n, dtype, layout, mask_kind, boolean, scale):
    if layout == "transposed":
        x = torch.randn(b, q, h, n, device=DEVICE).to(dtype).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(b, h, q, n + 2, device=DEVICE).to(dtype)[..., 1:n + 1]
    else:
        x = torch.randn(b, h, q, n, device=DEVICE).to(dtype)
    mask = make_mask(x, mask_kind, boolean)
    out = k.scaled_masked_softmax_triton(x, mask, scale)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, k.reference(*f64(x, mask), scale)) < KERNEL_TOL[dtype]


class _Allocations(TorchDispatchMode):
    """Records the shapes of new tensors that ATen ops allocate (views and in-place ops excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not func.is_view and not func._schema.is_mutable:
            self.shapes.append(tuple(out.shape))
        return out


def test_broadcast_mask_is_not_materialized():
    x, mask = torch.randn(2, 3, 4, 33, device=DEVICE), torch.randn(2, 1, 1, 33, device=DEVICE)
    with _Allocations() as allocs:
        out = k.scaled_masked_softmax_triton(x, mask, 0.5)
    assert allocs.shapes.count(tuple(x.shape)) == 1  # the output only
    assert rel_err(out, torch.softmax(x.double() * 0.5 + mask.double(), -1)) < 1e-5


@pytest.mark.parametrize("shape", [(7,), (5, 40), (3, 4, 20)])
def test_triton_kernel_fewer_dims(shape):
    x = torch.randn(shape, device=DEVICE)
    mask = torch.randn(shape[-1], device=DEVICE)
    out = k.scaled_masked_softmax_triton(x, mask, 2.0)
    assert rel_err(out, torch.softmax(x.double() * 2 + mask.double(), -1)) < 1e-5


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("boolean", [False, True])
def test_fully_masked_rows_are_nan_like_torch(boolean):
    x = torch.randn(2, 2, 3, 9, device=DEVICE)
    keep = torch.ones(2, 1, 3, 9, dtype=torch.bool, device=DEVICE)
    keep[1, :, 2] = False
    mask = keep if boolean else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    expected = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
    for out in (k.scaled_masked_softmax_triton(x, mask, 1.0), k.scaled_masked_softmax(x.cpu(), mask.cpu(), 1.0)):
        out = out.cpu()
        assert out[1, :, 2].isnan().all() and not out[0].isnan().any() and not out[1, :, :2].isnan().any()
        torch.testing.assert_close(out, expected.cpu(), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("boolean", [False, True])
def test_op_cpu_matches_reference(dtype, boolean):
    x = torch.randn(2, 3, 4, 129).to(dtype)
    mask = make_mask(x, "query_key", boolean)
    out = torch.ops.dsx.scaled_masked_softmax(x, mask, 0.3)
    assert out.dtype == dtype and rel_err(out, k.reference(*f64(x, mask), 0.3)) < TOL[dtype]
    assert rel_err(k.scaled_masked_softmax(x), torch.softmax(x.double(), -1)) < TOL[dtype]


def test_reference_definition():
    x, m = torch.randn(2, 2, 3, 8, dtype=torch.float64), torch.randn(2, 1, 1, 8, dtype=torch.float64)
    torch.testing.assert_close(k.reference(x, m, 0.7), torch.softmax(x * 0.7 + m, -1))
    keep = m > 0
    torch.testing.assert_close(k.reference(x, keep, 1.0), torch.softmax(x + torch.where(keep, 0.0, float("-inf")), -1))


def test_invalid_mask():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        k.scaled_masked_softmax(x, torch.randn(2, 3, 3, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        k.scaled_masked_softmax(x, torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="bool .* or floating"):
        k.scaled_masked_softmax(x, torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 4"):
        k.scaled_masked_softmax_triton(torch.randn(1, 2, 1, 2, 8), None, 1.0)


def test_gradcheck():
    x = torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 1, 1, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: k.scaled_masked_softmax(a, m, 0.6), (x,))
    assert torch.autograd.gradcheck(lambda a: k.scaled_masked_softmax(a, m > 0, 2.0), (x,))
    assert torch.autograd.gradcheck(lambda a: k.scaled_masked_softmax(a, None, 1.0), (x,))


def test_mask_gets_no_grad():
    x, m = torch.randn(2, 5, requires_grad=True), torch.randn(5, requires_grad=True)
    k.scaled_masked_softmax(x, m, 0.5)[:, 0].sum().backward()
    assert x.grad is not None and m.grad is None


def test_torch_compile_fullgraph():
    x, m = torch.randn(2, 2, 3, 40), torch.randn(2, 1, 3, 40)

    def f(x, m):
        return k.scaled_masked_softmax(x, m, 0.125) + k.scaled_masked_softmax(x, m > 0, 1.0)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, m), f(x, m), rtol=1e-5, atol=1e-6)


def test_export_keeps_op():
    class Scores(torch.nn.Module):
        def forward(self, q, kk, mask):
            return k.scaled_masked_softmax(q @ kk.transpose(-1, -2), mask, q.shape[-1] ** -0.5)

    mod, q, kk, mask = Scores(), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 1, 1, 4)
    ep = torch.export.export(mod, (q, kk, mask), strict=False)
    assert torch.ops.dsx.scaled_masked_softmax.default in {n.target for n in ep.graph.nodes}
    torch.testing.assert_close(ep.module()(q, kk, mask), mod(q, kk, mask))
