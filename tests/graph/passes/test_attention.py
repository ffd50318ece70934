import math

import pytest
import torch
import torch.nn as nn

from dsx.graph.fx_utils import finish
from dsx.graph.passes.attention import attention_to_sdpa
from dsx.graph.passes.fold_batch_norm import fold_batch_norm
from dsx.graph.passes.remove_dropout import remove_dropout
from tests.graph.pass_testing import export, rel_err
from tests.hf_models import tiny_hf

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


class Attn(nn.Module):
    """Manual attention in one of several spellings; ``kind`` picks the spelling."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, mask):
        e = q.shape[-1]
        if self.kind == "mul_mask":
            return torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(e)) + mask, dim=-1) @ v
        if self.kind == "mask_first":
            return torch.softmax(mask + torch.matmul(q, k.transpose(2, 3)) / math.sqrt(e), dim=-1) @ v
        if self.kind == "permute_no_scale":
            return torch.softmax(q @ k.permute(0, 1, 3, 2), dim=3) @ v
        if self.kind == "kt_input":
            return torch.softmax(q @ k * 0.5, dim=-1) @ v
        if self.kind == "bool_mask":
            s = (q @ k.transpose(-1, -2) / 3.0).masked_fill(mask < -1.0, float("-inf"))
            return torch.softmax(s, dim=-1) @ v
        if self.kind == "upcast":
            s = (q @ k.transpose(-1, -2)) * 0.25 + mask
            return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        raise ValueError(self.kind)


def _inputs(dtype=torch.float32, kt=False):
    q, k, v = (torch.randn(2, 3, n, e, dtype=dtype) for n, e in ((5, 8), (7, 8), (7, 6)))
    mask = torch.randn(2, 1, 5, 7, dtype=dtype)
    return q, (k.transpose(-2, -1).contiguous() if kt else k), v, mask


def _run(m, args):
    gm = export(m, *args)
    n = attention_to_sdpa(gm)
    finish(gm)
    return gm, n


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is SDPA]


@pytest.mark.parametrize("kind,dtype,scale,masked", [
    ("mul_mask", torch.float32, 1 / math.sqrt(8), True), ("mask_first", torch.float32, 1 / math.sqrt(8), True),
    ("permute_no_scale", torch.float32, 1.0, False), ("kt_input", torch.float32, 0.5, False),
    ("bool_mask", torch.float32, 1 / 3.0, True), ("upcast", torch.bfloat16, 0.25, True),
    ("upcast", torch.float32, 0.25, True)])
def test_manual_attention_becomes_sdpa(kind, dtype, scale, masked):
    m, args = Attn(kind), _inputs(dtype, kt=kind == "kt_input")
    gm, n = _run(m, args)
    assert n == 1
    (node,) = _sdpa_nodes(gm)
    assert node.kwargs["scale"] == pytest.approx(scale) and node.kwargs["dropout_p"] == 0.0
    assert (node.kwargs["attn_mask"] is not None) == masked
    assert node.meta["val"].shape == (2, 3, 5, 6)
    assert not any(n.target in (aten.softmax.int, aten.matmul.default) for n in gm.graph.nodes)
    assert rel_err(gm(*args), m(*args)) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


class Unsafe(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1)
        if self.kind == "mask_then_scale":
            return torch.softmax((s + mask) * 0.3, dim=-1) @ v
        if self.kind == "probs_returned":
            p = torch.softmax(s * 0.3, dim=-1)
            return p @ v, p
        if self.kind == "scores_reused":
            return torch.softmax(s, dim=-1) @ v, s
        if self.kind == "train_dropout":
            return torch.dropout(torch.softmax(s, dim=-1), 0.5, True) @ v
        if self.kind == "wrong_dim":
            return torch.softmax(s, dim=-2) @ v
        if self.kind == "tensor_scale":
            return torch.softmax(s * q.new_tensor(0.3), dim=-1) @ v
        if self.kind == "negative_scale":
            return torch.softmax(s * -0.3, dim=-1) @ v
        if self.kind == "scores_as_mask":
            return torch.softmax(s + s, dim=-1) @ v
        if self.kind == "probs_as_values":
            p = torch.softmax(s, dim=-1)
            return p @ p
        raise ValueError(self.kind)


@pytest.mark.parametrize("kind", ["mask_then_scale", "probs_returned", "scores_reused", "train_dropout",
                                  "wrong_dim", "tensor_scale", "negative_scale", "scores_as_mask", "probs_as_values"])
def test_not_rewritten(kind):
    q, k, v, mask = _inputs()
    m, args = Unsafe(kind), (q, k[..., :5, :], v[..., :5, :], mask[..., :5])  # square scores: L == S == 5
    gm, n = _run(m, args)
    assert n == 0 and not _sdpa_nodes(gm)
    if kind != "train_dropout":
        torch.testing.assert_close(gm(*args), m(*args))


def test_broadcast_leading_dims_not_rewritten():
    m = Attn("permute_no_scale")
    q, k, v, mask = _inputs()
    gm, n = _run(m, (q, k[:1], v[:1], mask))
    assert n == 0


def _export_hf(name, **extra):
    model, kw = tiny_hf(name)
    kw = {**kw, **extra, **({"use_cache": False} if name in ("gpt2", "llama") else {})}
    return model, kw, torch.export.export(model, (), kw, strict=False).module()


# dropout nodes removed per model: embeddings + per layer (attention probs, attention output, MLP output)
HF_DROPOUTS = {"bert": 7, "gpt2": 7, "llama": 2, "vit": 7}


@pytest.mark.parametrize("name", list(HF_DROPOUTS))
def test_hf_models(name):
    model, kw, gm = _export_hf(name)
    counts = {}
    for p in (remove_dropout, fold_batch_norm, attention_to_sdpa):
        counts[p.__name__] = p(gm)
        finish(gm)
    assert counts == {"remove_dropout": HF_DROPOUTS[name], "fold_batch_norm": 0, "attention_to_sdpa": 2}
    nodes = _sdpa_nodes(gm)
    assert all(n.kwargs["scale"] == pytest.approx(0.25) for n in nodes)
    if name in ("bert", "gpt2"):  # the padding mask reaches SDPA
        assert all(n.kwargs["attn_mask"] is not None for n in nodes)
    assert not any(n.target is aten.softmax.int for n in gm.graph.nodes)
    with torch.no_grad():
        ref, out = model(**kw)[0], gm(**kw)[0]
    assert rel_err(out, ref) < 1e-4


def test_hf_output_attentions_not_rewritten():
    model, kw, gm = _export_hf("bert", output_attentions=True)
    remove_dropout(gm)
    finish(gm)
    assert attention_to_sdpa(gm) == 0
