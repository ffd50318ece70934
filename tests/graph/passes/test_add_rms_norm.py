"""Tests for the add_rms_norm / rms_norm graph passes: aten.rms_norm and the Hugging Face decomposed RMSNorm,
on tiny blocks and on a tiny transformers LlamaModel."""

import pytest
import torch
import torch.nn as nn

from dsx.graph.fx_utils import finish
from dsx.graph.passes.add_rms_norm import add_rms_norm, rms_norm
from tests.graph.pass_testing import export, randomize, rel_err, targets

aten = torch.ops.aten
FUSED, LONE = torch.ops.dsx.add_rms_norm.default, torch.ops.dsx.rms_norm.default
DECOMPOSED = (aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default)


class HFRMSNorm(nn.Module):
    """Hand-written Hugging Face style RMSNorm (as in LlamaRMSNorm)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class PreNormBlock(nn.Module):
    """Two pre-norm residual sublayers and a final norm: the 1st norm is lone, the 2nd and 3rd read a residual add."""

    def __init__(self, norm, d: int = 32):
        super().__init__()
        self.n1, self.n2, self.n_f = norm(d), norm(d), norm(d)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = x + self.fc1(self.n1(x))
        h = h + self.fc2(self.n2(h))
        return self.n_f(h), h










def run(gm: torch.fx.GraphModule) -> tuple[int, int]:
    counts = add_rms_norm(gm), rms_norm(gm)
    finish(gm)
    return counts


# Inputs of size ~1e-3 make eps (1e-6 / finfo eps) matter, so a wrong eps fails the comparison.
@pytest.mark.parametrize(
    "norm", [nn.RMSNorm, lambda d: nn.RMSNorm(d, eps=1e-6), HFRMSNorm], ids=["rms_default_eps", "rms", "hf"]
)
def test_pre_norm_block_fused_and_matches_eager(norm):
    block, x = randomize(PreNormBlock(norm), std=1e-3), torch.randn(2, 5, 32) * 1e-3
    gm = export(block, x)
    assert run(gm) == (2, 1)
    ops = targets(gm)
    assert ops.count(FUSED) == 2 and ops.count(LONE) == 1
    assert not {aten.add.Tensor, aten.rms_norm.default, *DECOMPOSED} & set(ops)
    for out, ref in zip(gm(x), block(x)):
        assert rel_err(out, ref) < 1e-5


def test_hf_rms_norm_bf16_bit_exact():
    block = randomize(PreNormBlock(HFRMSNorm), std=1e-3).to(torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16) * 1e-3
    gm = export(block, x)
    assert run(gm) == (2, 1)
    for out, ref in zip(gm(x), block(x)):
        assert torch.equal(out, ref)


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.shift = HFRMSNorm(16), nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.norm(x + self.shift)


class TwoDimNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm((4, 16))

    def forward(self, x):
        return self.norm(x + x.flip(0))


class VarianceReused(nn.Module):
    """The mean of squares is also returned, so the decomposed chain cannot be removed."""

    def forward(self, x):
        h = (x + x.flip(0)).float()
        var = h.pow(2).mean(-1, keepdim=True)
        return h * torch.rsqrt(var + 1e-6), var


class MeanOverRows(nn.Module):
    def forward(self, x):
        h = x + x.flip(0)
        return h * torch.rsqrt(h.pow(2).mean(-2, keepdim=True) + 1e-6)


@pytest.mark.parametrize("module, counts", [(Broadcast(), (0, 1)), (TwoDimNorm(), (0, 0)), (VarianceReused(), (0, 0)),
                                            (MeanOverRows(), (0, 0))])
def test_not_fused(module, counts):
    x = torch.randn(3, 4, 16)
    gm = export(module, x)
    assert run(gm) == counts
    assert FUSED not in targets(gm) and (LONE in targets(gm)) == bool(counts[1])
    for out, ref in zip(torch.utils._pytree.tree_leaves(gm(x)), torch.utils._pytree.tree_leaves(module(x))):
        assert rel_err(out, ref) < 1e-5


def test_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100, attn_implementation="eager")
    model, ids = transformers.LlamaModel(cfg).eval(), torch.randint(0, 100, (2, 8))
    gm = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, strict=False).module()
    # Per layer: input norm + post-attention norm; then the final norm. Only layer 0's input norm has no residual add.
    assert run(gm) == (4, 1)
    assert not set(DECOMPOSED) & set(targets(gm))
    with torch.no_grad():
        out, ref = gm(input_ids=ids, use_cache=False), model(input_ids=ids, use_cache=False)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
