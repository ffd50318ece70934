"""Unit layouts of more Hugging Face architectures for structured pruning: fused q/k/v and gate/up projections
(Phi-3, GPT-NeoX, Falcon, Bloom), DeBERTa-v2 and T5 attention, MoE experts stored as 3-D tensors and routers."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from dsx.compress.hf import (HeadLayout, HeadSlice, head_layout, is_int, linears, out_proj, out_slices, patch_heads,
                             qkv_inputs)

ALIBI = ("ALiBi attention: the position bias gives each head a slope from its index and the model's head count, so "
         "removing heads would change the biases of the heads kept")
EXPERT_MULTIPLE = 8
"""Experts keep a multiple of 8 neurons: grouped GEMMs (transformers' default experts kernel) need 16-byte strides."""
EXPERT_WIDTHS = ("intermediate_dim", "intermediate_size")
"""The attributes MoE experts keep their width in (Mixtral / Qwen-MoE, GPT-OSS)."""
ROUTER = "a MoE router: one output per expert, and the experts stay (their MLP neurons are pruned)"


class LayerConfig:
    """A model config shared by all layers as one pruned layer sees it: its own head counts, every other value (the
    attention implementation included) read through from the shared config."""

    def __init__(self, shared: Any, **own: int):
        self.shared = shared
        self.own = own

    def __getattr__(self, name: str) -> Any:
        if name in ("shared", "own"):  # not set yet: an instance being copied or unpickled
            raise AttributeError(name)
        return self.own[name] if name in self.own else getattr(self.shared, name)


def _phi3_attention(m: nn.Module) -> HeadLayout | None:
    """Phi-3: qkv_proj's output is [query heads | key heads | value heads]; a unit is a KV head with its queries."""
    if not (linears(m, "qkv_proj", "o_proj") and is_int(m, "head_dim") and is_int(m, "num_key_value_groups")):
        return None
    d, rep = m.head_dim, m.num_key_value_groups
    heads = out_slices(m, ("qkv_proj",), 0, (rep * d, d, d)) + [HeadSlice("o_proj", "weight", 1, (rep * d,))]
    return HeadLayout(m.o_proj.in_features // (rep * d), rep, d, (("qkv_proj", "weight", 1, "q"),), tuple(heads),
                      out_proj("o_proj", 0))


def _patch_phi3(m: nn.Module) -> dict[str, int]:
    """Phi-3 slices q / k / v with the shared config's head count: the layer gets a ``LayerConfig`` of its own."""
    kv = m.o_proj.in_features // (m.num_key_value_groups * m.head_dim)
    heads = kv * m.num_key_value_groups
    m.num_key_value_heads = kv
    shared = m.config.shared if isinstance(m.config, LayerConfig) else m.config
    if (heads, kv) != (shared.num_attention_heads, shared.num_key_value_heads):
        m.config = LayerConfig(shared, num_attention_heads=heads, num_key_value_heads=kv)
    return {"heads": heads, "kv_heads": kv}


def _gate_up_mlp(m: nn.Module) -> HeadLayout | None:
    """Phi-3's MLP: gate_up_proj's output is [gate | up], chunked in two; neuron i is row i of both halves and
    input i of down_proj."""
    if not linears(m, "gate_up_proj", "down_proj") or hasattr(m, "up_proj"):
        return None
    heads = out_slices(m, ("gate_up_proj",), 0, (1, 1)) + [HeadSlice("down_proj", "weight", 1, (1,))]
    return HeadLayout(m.down_proj.in_features, 1, 1, (("gate_up_proj", "weight", 1, "q"),), tuple(heads),
                      out_proj("down_proj", 0))


def _neox_attention(m: nn.Module) -> HeadLayout | None:
    """GPT-NeoX: query_key_value's output holds each head's [query | key | value] in turn."""
    if not (linears(m, "query_key_value", "dense") and is_int(m, "head_size")):
        return None
    d = m.head_size
    heads = out_slices(m, ("query_key_value",), 0, (3 * d,)) + [HeadSlice("dense", "weight", 1, (d,))]
    return HeadLayout(m.dense.in_features // d, 1, d, (("query_key_value", "weight", 1, "q"),), tuple(heads),
                      out_proj("dense", 0))


def _no_sizes(m: nn.Module) -> None:
    """Nothing to set: forward reads no size (Phi-3's MLP chunks in two, a router keeps its experts)."""


def _patch_neox(m: nn.Module) -> dict[str, int]:
    heads = m.dense.in_features // m.head_size  # forward reshapes with -1 heads
    return {"heads": heads, "kv_heads": heads}


def _falcon_bloom_attention(m: nn.Module) -> HeadLayout | None:
    """Falcon and Bloom: query_key_value's output holds per KV group [its query heads | key | value] (Falcon's new
    decoder architecture), [all query heads | the one key | value] (multi-query: key and value stay) or each head's
    [query | key | value] in turn (Bloom, Falcon-RW). With ALiBi no head may go."""
    if not (linears(m, "query_key_value", "dense") and is_int(m, "head_dim") and is_int(m, "num_heads")):
        return None
    d, n = m.head_dim, m.dense.in_features // m.head_dim
    params = list(inspect.signature(m.forward).parameters)
    reason = ALIBI if getattr(getattr(m, "config", None), "alibi", False) or "alibi" in params else None
    inputs, out = (("query_key_value", "weight", 1, "q"),), out_proj("dense", 0)
    if "residual" in params and m.dense.bias is not None:  # Bloom adds it to dense's output: tie their channels
        inputs += (("dense", "bias", 0, params.index("residual")),)
    if getattr(m, "new_decoder_architecture", False) and is_int(m, "num_key_value_groups"):
        rep = m.num_key_value_groups
        heads = out_slices(m, ("query_key_value",), 0, ((rep + 2) * d,)) + [HeadSlice("dense", "weight", 1, (rep * d,))]
        return HeadLayout(n // rep, rep, d, inputs, tuple(heads), out, reason=reason)
    if getattr(m, "multi_query", False):
        heads = out_slices(m, ("query_key_value",), 0, (d,), fixed=2 * d)
    else:
        heads = out_slices(m, ("query_key_value",), 0, (3 * d,))
    heads.append(HeadSlice("dense", "weight", 1, (d,)))
    return HeadLayout(n, 1, d, inputs, tuple(heads), out, reason=reason)


def _patch_falcon_bloom(m: nn.Module) -> dict[str, int]:
    heads = m.dense.in_features // m.head_dim
    m.num_heads = heads
    if getattr(m, "new_decoder_architecture", False):
        kv = heads // m.num_key_value_groups
    elif getattr(m, "multi_query", False):
        kv = 1
    else:
        kv = heads
    for attr, value in (("num_kv_heads", kv), ("num_key_value_groups", heads // kv)):
        if is_int(m, attr):
            setattr(m, attr, value)
    return {"heads": heads, "kv_heads": kv}


def _deberta_attention(m: nn.Module) -> HeadLayout | None:
    """DeBERTa-v2's disentangled attention: query / key / value and the relative-position projections (which read
    the ``rel_embeddings`` argument) hold the heads; the output projection lives outside."""
    if not (linears(m, "query_proj", "key_proj", "value_proj") and is_int(m, "attention_head_size")
            and is_int(m, "num_attention_heads")):
        return None
    d = m.attention_head_size
    pos = tuple(n for n in ("pos_key_proj", "pos_query_proj") if linears(m, n))
    inputs = qkv_inputs("query_proj", "key_proj", "value_proj") + tuple((n, "weight", 1, "rel_embeddings") for n in pos)
    if getattr(m, "share_att_key", False):  # query and key also project the relative positions
        inputs += (("query_proj", "weight", 1, "rel_embeddings"), ("key_proj", "weight", 1, "rel_embeddings"))
    heads = out_slices(m, ("query_proj", "key_proj", "value_proj", *pos), 0, (d,))
    return HeadLayout(m.query_proj.out_features // d, 1, d, inputs, tuple(heads))


def _patch_deberta(m: nn.Module) -> dict[str, int]:
    heads = m.query_proj.out_features // m.attention_head_size
    m.num_attention_heads = heads
    m.all_head_size = heads * m.attention_head_size
    return {"heads": heads, "kv_heads": heads}


def _t5_attention(m: nn.Module) -> HeadLayout | None:
    """T5: q / k / v / o; the first layer of each stack holds the relative position bias (an embedding with one
    column per head) and passes the bias on to the other layers, so they all keep the same heads."""
    if not (linears(m, "q", "k", "v", "o") and is_int(m, "key_value_proj_dim") and is_int(m, "n_heads")):
        return None
    d = m.key_value_proj_dim
    heads = out_slices(m, ("q", "k", "v"), 0, (d,)) + [HeadSlice("o", "weight", 1, (d,))]
    if isinstance(getattr(m, "relative_attention_bias", None), nn.Embedding):
        heads.append(HeadSlice("relative_attention_bias", "weight", 1, (1,)))
    return HeadLayout(m.o.in_features // d, 1, d, qkv_inputs("q", "k", "v"), tuple(heads), out_proj("o", 0),
                      head_inputs=("position_bias",))


def _patch_t5(m: nn.Module) -> dict[str, int]:
    heads = m.o.in_features // m.key_value_proj_dim
    m.n_heads = heads
    m.inner_dim = heads * m.key_value_proj_dim
    return {"heads": heads, "kv_heads": heads}


def _expert_dims(m: nn.Module) -> tuple[str, int, int] | None:
    """MoE experts as 3-D tensors: (input projection, its neuron dim, down_proj's neuron dim), None otherwise."""
    up = "gate_up_proj" if getattr(m, "has_gate", True) else "up_proj"
    tensors = getattr(m, up, None), getattr(m, "down_proj", None)
    if not all(isinstance(t, nn.Parameter) and t.dim() == 3 for t in tensors) or not is_int(m, "num_experts") \
            or getattr(m, "has_post_expert_norm", False):
        return None
    return (up, 2, 1) if getattr(m, "is_transposed", False) else (up, 1, 2)


def expert_tensors(module: nn.Module) -> tuple[str, ...]:
    """The names of the 3-D weights of MoE experts (input projection, down_proj), () for any other module.

    Args:
        module: any module.

    Returns:
        The tensor names, or ().
    """
    dims = _expert_dims(module)
    return () if dims is None else (dims[0], "down_proj")


def _experts(m: nn.Module) -> HeadLayout | None:
    """MoE experts stored as 3-D tensors [experts, out, in] ([experts, in, out] when transposed): the input
    projection holds [gate | up] (or gate and up interleaved per neuron, or only up), biases optional. A unit is
    neuron i of every expert, so all experts keep the same width."""
    dims = _expert_dims(m)
    if dims is None:
        return None
    up, neuron, down_neuron = dims
    repeats = (1,) if up == "up_proj" else (1, 1) if getattr(m, "is_concatenated", True) else (2,)
    heads = [HeadSlice("", up, neuron, repeats), HeadSlice("", f"{up}_bias", 1, repeats),
             HeadSlice("", "down_proj", down_neuron, (1,))]
    heads = [s for s in heads if isinstance(getattr(m, s.tensor, None), torch.Tensor)]
    return HeadLayout(m.down_proj.shape[down_neuron], 1, 1, (("", up, 3 - neuron, "q"),), tuple(heads),
                      (("", "down_proj", 3 - down_neuron), ("", "down_proj_bias", 1)), multiple=EXPERT_MULTIPLE)


def _patch_experts(m: nn.Module) -> None:
    for attr in EXPERT_WIDTHS:
        if is_int(m, attr):
            setattr(m, attr, m.down_proj.shape[_expert_dims(m)[2]])


def _router(m: nn.Module) -> HeadLayout | None:
    """A MoE router: a bare [experts, hidden] weight (and bias) scoring the experts for each token."""
    w = getattr(m, "weight", None)
    if not (isinstance(w, nn.Parameter) and w.dim() == 2 and is_int(m, "num_experts") and is_int(m, "top_k")
            and w.shape[0] == m.num_experts and not any(True for _ in m.children())):
        return None
    heads = [HeadSlice("", "weight", 0, (1,))]
    if isinstance(getattr(m, "bias", None), torch.Tensor):
        heads.append(HeadSlice("", "bias", 0, (1,)))
    return HeadLayout(m.num_experts, 1, 1, (("", "weight", 1, "q"),), tuple(heads), reason=ROUTER)


_RULES: tuple[tuple[Callable[[nn.Module], HeadLayout | None], Callable[[nn.Module], dict[str, int] | None]], ...] = (
    (_phi3_attention, _patch_phi3), (_gate_up_mlp, _no_sizes), (_neox_attention, _patch_neox),
    (_falcon_bloom_attention, _patch_falcon_bloom), (_deberta_attention, _patch_deberta), (_t5_attention, _patch_t5),
    (_experts, _patch_experts), (_router, _no_sizes), (head_layout, patch_heads))
"""(layout, patch) per architecture, in the order they are tried: the first layout found decides."""


def unit_layout(module: nn.Module) -> HeadLayout | None:
    """The layout of a module that structured pruning traces as one unit (attention, a fused MLP, MoE experts or
    router), None for any other module or one whose tensors do not match its layout.

    Args:
        module: any module of the model being pruned.

    Returns:
        How its weights hold its heads or neurons, or None.
    """
    for rule, _ in _RULES:
        layout = rule(module)
        if layout is not None:
            return layout if layout.fits(module) else None
    return None


def patch_unit(module: nn.Module) -> dict[str, int] | None:
    """After shrinking, set the sizes ``module.forward`` reads to match its weights (head counts, MoE experts'
    width, a Phi-3 layer's own config).

    Args:
        module: a module ``unit_layout`` gave a layout for.

    Returns:
        Its head counts {"heads", "kv_heads"} for attention, None for an MLP, experts or router.
    """
    for rule, patch in _RULES:
        if rule(module) is not None:
            return patch(module)
    return None
