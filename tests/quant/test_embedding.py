"""QuantizedEmbedding: error within half a step per group, row-only lookups, padding, bytes, bit-exact reload."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from dsx.quant.embedding import QuantizedEmbedding


def _table(num: int = 300, dim: int = 128, seed: int = 0, **kwargs) -> nn.Embedding:
    torch.manual_seed(seed)
    emb = nn.Embedding(num, dim, **kwargs)
    with torch.no_grad():
        emb.weight.add_(torch.rand(num, 1) - 0.5)  # skewed rows: the 4-bit offsets matter
    return emb


def _step_per_value(q: QuantizedEmbedding) -> torch.Tensor:
    return q.scale.float().repeat_interleave(q.group_size, dim=1)


@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 32), (4, None), (4, 16)])
def test_error_within_half_a_step_per_group(bits, group_size):
    emb = _table()
    q = QuantizedEmbedding.from_float(emb, bits=bits, group_size=group_size)
    expected_group = group_size or (128 if bits == 8 else 64)
    assert q.group_size == expected_group and q.scale.shape == (300, 128 // expected_group)
    err = (q.dequantize() - emb.weight.detach()).abs()
    step = _step_per_value(q)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert (step > 0).all()
    rel = (err.norm() / emb.weight.detach().norm()).item()
    assert rel < (0.01 if bits == 8 else 0.1)


def test_4bit_codes_span_each_group():
    q = QuantizedEmbedding.from_float(_table(), bits=4)
    w = _table().weight.detach().unflatten(-1, (-1, 64))
    lo, hi = q.offset.float(), q.offset.float() + 15 * q.scale.float()
    assert (lo <= w.amin(-1)).all() and (hi >= w.amax(-1)).all()
    codes = torch.stack((q.qweight & 15, q.qweight >> 4), dim=-1).flatten(-2)
    assert codes.min() == 0 and codes.max() == 15


@pytest.mark.parametrize("bits", [8, 4])
def test_forward_matches_dequantized_rows_and_dtype(bits):
    emb = _table().to(torch.bfloat16)
    q = QuantizedEmbedding.from_float(emb, bits=bits)
    idx = torch.tensor([[5, 0, 299], [17, 17, 3]])
    out = q(idx)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 128)
    assert torch.equal(out, q.dequantize()[idx])
    assert q(torch.tensor(7)).shape == (128,)
    with pytest.raises(IndexError):
        q(torch.tensor([300]))


@pytest.mark.parametrize("bits", [8, 4])
def test_lookup_never_expands_the_whole_table(bits):
    q = QuantizedEmbedding.from_float(_table(num=20000, dim=64), bits=bits)
    idx = torch.tensor([3, 19999, 42])

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        q(idx)
    assert 0 < Largest.numel <= 3 * 64


@pytest.mark.parametrize("bits", [8, 4])
def test_padding_idx_kept_and_row_quantized_as_is(bits):
    zero_pad = QuantizedEmbedding.from_float(_table(num=50, dim=64, padding_idx=-1), bits=bits)
    assert zero_pad.padding_idx == 49 and "padding_idx=49" in repr(zero_pad)
    emb = _table(num=50, dim=64, padding_idx=0)
    with torch.no_grad():
        emb.weight[0].zero_()
    assert torch.equal(QuantizedEmbedding.from_float(emb, bits=bits)(torch.tensor([0])), torch.zeros(1, 64))
    with torch.no_grad():
        emb.weight[0] = torch.linspace(-1, 1, 64)
    q = QuantizedEmbedding.from_float(emb, bits=bits)
    assert q.padding_idx == 0
    err = (q(torch.tensor([0]))[0] - emb.weight[0].detach()).abs()
    assert 0 < err.max() and (err <= _step_per_value(q)[0] / 2 * (1 + 1e-5) + 1e-7).all()


def test_bytes():
    emb = _table(num=1000, dim=256)
    fp32 = emb.weight.numel() * 4
    nbytes = {bits: sum(b.numel() * b.element_size() for b in QuantizedEmbedding.from_float(emb, bits).buffers())
              for bits in (8, 4)}
    assert nbytes[4] <= fp32 / 7
    assert nbytes[8] <= fp32 / 3.9


@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 16), (4, None), (4, 32)])
def test_safetensors_round_trip_into_a_fresh_module_is_bit_exact(tmp_path, bits, group_size):
    emb = _table(num=64, dim=96, padding_idx=2)
    q = QuantizedEmbedding.from_float(emb, bits=bits, group_size=group_size)
    assert set(q.state_dict()) == ({"qweight", "scale"} if bits == 8 else {"qweight", "scale", "offset"})
    save_file(q.state_dict(), tmp_path / "emb.safetensors")
    fresh = QuantizedEmbedding.from_float(_table(num=64, dim=96, seed=1, padding_idx=2), bits, group_size)
    built = QuantizedEmbedding(64, 96, bits=bits, group_size=group_size, padding_idx=2)
    idx = torch.arange(64).view(8, 8)
    for target in (fresh, built):
        assert not torch.equal(target(idx), q(idx))
        target.load_state_dict(load_file(tmp_path / "emb.safetensors"), strict=True)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), q.state_dict().values()))
        assert torch.equal(target(idx), q(idx))


def test_extra_repr():
    q = QuantizedEmbedding.from_float(nn.Embedding(10, 32).half(), bits=4, group_size=16)
    assert repr(q) == "QuantizedEmbedding(10, 32, bits=4, group_size=16, dtype=torch.float16)"
    assert "QuantizedEmbedding(10, 32, bits=8, group_size=32)" == repr(QuantizedEmbedding(10, 32))


def test_errors():
    emb = nn.Embedding(10, 64)
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        QuantizedEmbedding.from_float(emb, bits=3)
    with pytest.raises(ValueError, match="embedding_dim 64 is not divisible by group_size 48"):
        QuantizedEmbedding.from_float(emb, bits=8, group_size=48)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        QuantizedEmbedding.from_float(emb, bits=4, group_size=0)
    with pytest.raises(ValueError, match="embedding_dim must be even, got 63"):
        QuantizedEmbedding.from_float(nn.Embedding(10, 63), bits=4, group_size=9)
    with pytest.raises(ValueError, match="embedding_dim 100 is not divisible by group_size 64"):
        QuantizedEmbedding.from_float(nn.Embedding(10, 100), bits=4, group_size=64)
    assert [QuantizedEmbedding(10, dim, bits=4).group_size for dim in (128, 96, 100, 8)] == [64, 32, 100, 8]
    with pytest.raises(ValueError, match="max_norm is not supported"):
        QuantizedEmbedding.from_float(nn.Embedding(10, 64, max_norm=1.0))
    with pytest.raises(ValueError, match="sparse=True is not supported"):
        QuantizedEmbedding.from_float(nn.Embedding(10, 64, sparse=True))
    with pytest.raises(TypeError, match="expected an nn.Embedding, got EmbeddingBag"):
        QuantizedEmbedding.from_float(nn.EmbeddingBag(10, 64))
    with torch.no_grad():
        emb.weight[3, 3] = float("inf")
    with pytest.raises(ValueError, match="inf or nan"):
        QuantizedEmbedding.from_float(emb)
    with torch.no_grad():
        emb.weight[3, 3] = 1e6
    assert QuantizedEmbedding.from_float(emb, bits=8).scale.dtype == torch.float32
    with pytest.raises(ValueError, match="float16 offsets"):
        QuantizedEmbedding.from_float(emb, bits=4)
    with pytest.raises(ValueError, match="padding_idx must be within"):
        QuantizedEmbedding(10, 64, padding_idx=10)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        QuantizedEmbedding(10, 64, dtype=torch.int64)
