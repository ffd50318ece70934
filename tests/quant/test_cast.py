"""dsx.quant.cast: cast_float moves float parameters and buffers to bf16 / fp16 (quantized layers keep their integer
weights and fp32 scales) while the model keeps taking and returning its own float dtype; compute_dtype reports it.
"""

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.quant.cast import cast_float, compute_dtype
from dsx.quant.config import Int8Dynamic
from dsx.quant.linear import Int8Linear, QuantLinear

HALF = [torch.bfloat16, torch.float16]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 8)
        self.norm = nn.LayerNorm(32)
        self.register_buffer("shift", torch.full((32,), 0.5))
        self.register_buffer("steps", torch.tensor(3))

    def forward(self, x, scale=1.0):
        return self.down(self.norm(torch.relu(self.up(x)) + self.shift) * scale)


class Pair(nn.Module):
    """Returns a dict of a float tensor and an integer tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, ids):
        return {"y": self.lin(x), "ids": ids + 1}


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def x():
    return torch.randn(4, 16)


@pytest.mark.parametrize("dtype", HALF)
def test_float_state_is_cast_in_place(net, dtype):
    assert compute_dtype(net) is None
    out = cast_float(net, dtype)
    assert out is net and compute_dtype(net) == dtype
    assert all(p.dtype == dtype for p in net.parameters())
    assert net.shift.dtype == dtype and net.steps.dtype == torch.int64 and int(net.steps) == 3
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())


@pytest.mark.parametrize("dtype", HALF)
def test_the_model_still_takes_and_returns_fp32(net, x, dtype):
    ref = net(x)
    cast_float(net, dtype)
    out = net(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    assert torch.allclose(out, ref, atol=tol, rtol=tol) and not torch.equal(out, ref)
    assert net(x, scale=2.0).dtype == torch.float32


def test_inputs_are_cast_to_the_compute_dtype_and_non_float_leaves_are_left_alone(x):
    torch.manual_seed(0)
    model = Pair().eval()
    seen = {}
    model.lin.register_forward_pre_hook(lambda m, args: seen.update(dtype=args[0].dtype))
    cast_float(model, torch.bfloat16)
    ids = torch.arange(3)
    out = model(torch.randn(2, 4), ids=ids)
    assert seen["dtype"] == torch.bfloat16
    assert out["y"].dtype == torch.float32 and out["ids"].dtype == torch.int64 and torch.equal(out["ids"], ids + 1)


def test_a_float64_model_returns_float64():
    torch.manual_seed(0)
    model = nn.Linear(8, 4).double().eval()
    cast_float(model, torch.float16)
    assert model.weight.dtype == torch.float16
    assert model(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_quantlinear_keeps_int8_weight_and_fp32_scale_but_casts_its_bias():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    model = nn.Sequential(Int8Linear.from_float(lin), nn.ReLU(), nn.Linear(8, 4)).eval()
    q = model[0]
    scale = q.weight_scale.clone()
    cast_float(model, torch.bfloat16)
    assert isinstance(q, QuantLinear)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, scale)
    assert q.bias.dtype == torch.bfloat16 and model[2].weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 16)).dtype == torch.float32


def test_a_root_quantlinear_is_cast_too():
    torch.manual_seed(0)
    q = Int8Linear.from_float(nn.Linear(16, 4))
    cast_float(q, torch.float16)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float16
    assert q(torch.randn(2, 16)).dtype == torch.float32 and compute_dtype(q) == torch.float16


@pytest.mark.parametrize("dtype", HALF)
def test_a_model_quantized_by_dsx_keeps_its_int8_weights(net, x, dtype):
    ref = net(x)
    q = dsx.quantize(net, "int8", progress=False)
    cast_float(q, dtype)
    assert q.up.weight.dtype == torch.int8 and q.down.weight.dtype == torch.int8
    assert q.up.weight_scale.dtype == torch.float32 and q.up.bias.dtype == dtype
    assert q.norm.weight.dtype == dtype and q.shift.dtype == dtype
    out = q(x)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=0.1, rtol=0.1)
    assert compute_dtype(net) is None


def test_float8_tensors_are_left_as_they_are():
    model = nn.Linear(4, 4)
    model.register_buffer("codes", torch.zeros(4).to(torch.float8_e4m3fn))
    cast_float(model, torch.bfloat16)
    assert model.codes.dtype == torch.float8_e4m3fn and model.weight.dtype == torch.bfloat16


def test_a_quantized_embedding_computes_in_the_dtype_with_its_int8_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 4)).eval()
    ids = torch.randint(0, 32, (2, 5))
    q = dsx.quantize(model, "embedding_int8", progress=False)
    emb = q[0]
    cast_float(q, torch.bfloat16)
    assert emb.dtype == torch.bfloat16 and emb.qweight.dtype == torch.int8 and emb.scale.dtype == torch.float32
    assert q[1].weight.dtype == torch.bfloat16
    assert q(ids).dtype == torch.float32
    assert torch.allclose(q(ids), model(ids), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("second", HALF)
def test_casting_twice_is_refused(net, second):
    cast_float(net, torch.bfloat16)
    with pytest.raises(ValueError, match=r"^dtype: the model already computes in torch\.bfloat16; cast the original"):
        cast_float(net, second)
    assert compute_dtype(net) == torch.bfloat16 and net.up.weight.dtype == torch.bfloat16


def test_a_mixed_quantize_is_refused_on_a_cast_model(net):
    cast_float(net, torch.float16)
    with pytest.raises(ValueError, match="^dtype: the model already computes in torch.float16"):
        dsx.quantize(net, Int8Dynamic(dtype="bfloat16"), progress=False)


def test_a_mixed_format_quantize_records_its_compute_dtype(net, x):
    q = dsx.quantize(net, Int8Dynamic(dtype="bfloat16"), progress=False)
    assert compute_dtype(q) == torch.bfloat16 and compute_dtype(net) is None
    assert q.up.weight.dtype == torch.int8 and q.norm.weight.dtype == torch.bfloat16
    assert q(x).dtype == torch.float32
    with pytest.raises(ValueError, match="^dtype:"):
        cast_float(q, torch.float16)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, "bfloat16"])
def test_only_half_precision_dtypes_are_accepted(dtype):
    with pytest.raises(ValueError, match="dtype: expected torch.bfloat16 or torch.float16"):
        cast_float(nn.Linear(4, 4), dtype)


def test_a_half_precision_model_cast_to_the_other_half_takes_its_own_dtype():
    model = nn.Linear(4, 3).half()
    cast_float(model, torch.bfloat16)
    out = model(torch.randn(2, 4, dtype=torch.float16))
    assert out.dtype == torch.float16 and model.weight.dtype == torch.bfloat16
