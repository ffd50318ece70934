"""Attention layouts for structured pruning: which weight dims hold which heads, and the attributes forward reads.

Matched by structure (projection names and head attributes), so BERT/ViT-, GPT-2- and Llama/Mistral/Qwen-style
attention of Hugging Face transformers prune whole heads (whole KV groups under grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class HeadSlice:
    """A dim of ``module.tensor`` laid out as ``tiles`` copies of [unit 0 ... unit n-1], ``repeat`` positions each."""

    module: str
    tensor: str
    dim: int
    repeat: int
    tiles: int = 1


@dataclass(frozen=True)
class HeadLayout:
    """How one attention module stores its heads. A pruning unit is a head, or a KV group with its query heads.

    ``inputs``: (module, tensor, dim, source) dims that read the hidden states (source "kv": the key/value input);
    ``output``: the output projection inside the module as (module, weight dim), or None when it lives outside.
    """

    units: int
    heads_per_unit: int
    head_dim: int
    inputs: tuple[tuple[str, str, int, str], ...]
    heads: tuple[HeadSlice, ...]
    output: tuple[str, int] | None


def _linears(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _int(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2): a linear layer with the weight stored as [in, out]."""
    return type(module).__name__ == "Conv1D" and _int(module, "nf") and getattr(module, "weight", None) is not None


def _out_slices(module: nn.Module, names: tuple[str, ...], dim: int, repeat: int, tiles: int = 1) -> list[HeadSlice]:
    """The head-ordered output dim of each named projection: its weight ``dim`` and its bias, when it has one."""
    slices = []
    for n in names:
        slices.append(HeadSlice(n, "weight", dim, repeat, tiles))
        if getattr(getattr(module, n), "bias", None) is not None:
            slices.append(HeadSlice(n, "bias", 0, repeat, tiles))
    return slices


def _qkv_inputs(q: str, k: str, v: str) -> tuple[tuple[str, str, int, str], ...]:
    """The input dims of separate query / key / value linears: the query reads the hidden states, key and value
    the key/value input (the same, except in cross-attention)."""
    return (q, "weight", 1, "q"), (k, "weight", 1, "kv"), (v, "weight", 1, "kv")


def head_layout(module: nn.Module) -> HeadLayout | None:
    """The head layout of a supported attention module, None for anything else."""
    if _linears(module, "query", "key", "value") and _int(module, "attention_head_size") \
            and _int(module, "num_attention_heads"):  # BERT / RoBERTa / ViT: the output projection lives outside
        d = module.attention_head_size
        return HeadLayout(module.query.out_features // d, 1, d, _qkv_inputs("query", "key", "value"),
                          tuple(_out_slices(module, ("query", "key", "value"), 0, d)), None)
    fused = is_conv1d(getattr(module, "c_attn", None)) and is_conv1d(getattr(module, "c_proj", None))
    if fused and _int(module, "head_dim") and _int(module, "split_size") \
            and not getattr(module, "is_cross_attention", False):  # GPT-2: one Conv1D holds q | k | v
        d = module.head_dim
        heads = _out_slices(module, ("c_attn",), 1, d, tiles=3) + [HeadSlice("c_proj", "weight", 0, d)]
        return HeadLayout(module.split_size // d, 1, d, (("c_attn", "weight", 0, "q"),), tuple(heads), ("c_proj", 1))
    if _linears(module, "q_proj", "k_proj", "v_proj", "o_proj") and _int(module, "head_dim") \
            and _int(module, "num_key_value_groups"):  # Llama-style; a unit is a KV head with its query heads
        d, rep = module.head_dim, module.num_key_value_groups
        heads = _out_slices(module, ("q_proj",), 0, rep * d) + _out_slices(module, ("k_proj", "v_proj"), 0, d)
        heads.append(HeadSlice("o_proj", "weight", 1, rep * d))
        return HeadLayout(module.k_proj.out_features // d, rep, d, _qkv_inputs("q_proj", "k_proj", "v_proj"),
                          tuple(heads), ("o_proj", 0))
    return None


def patch_heads(module: nn.Module) -> dict[str, int]:
    """Set the head counts ``module.forward`` reads from its (already shrunk) weights; return them."""
    if _linears(module, "query", "key", "value"):
        heads = module.query.out_features // module.attention_head_size
        module.num_attention_heads = heads
        module.all_head_size = heads * module.attention_head_size
        return {"heads": heads, "kv_heads": heads}
    if is_conv1d(getattr(module, "c_attn", None)):
        heads = module.c_attn.nf // (3 * module.head_dim)
        module.num_heads = heads
        module.split_size = heads * module.head_dim
        return {"heads": heads, "kv_heads": heads}
    heads = module.q_proj.out_features // module.head_dim
    kv_heads = module.k_proj.out_features // module.head_dim
    for attr, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
        if _int(module, attr):
            setattr(module, attr, value)
    return {"heads": heads, "kv_heads": kv_heads}


def patch_mlp(module: nn.Module) -> int | None:
    """The intermediate width of a Llama-, BERT- or GPT-2-style MLP block (None for other modules), also set as
    its ``intermediate_size`` attribute where it has one."""
    if _linears(module, "up_proj", "down_proj"):
        if _int(module, "intermediate_size"):
            module.intermediate_size = module.up_proj.out_features
        return module.up_proj.out_features
    if type(module).__name__.endswith("Intermediate") and _linears(module, "dense"):
        return module.dense.out_features
    if is_conv1d(getattr(module, "c_fc", nn.Identity())):
        return module.c_fc.nf
    return None


def sync_config(model: nn.Module, heads: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Update ``model.config`` where one value holds for every layer and the config can express it; return the
    changes. Head counts go in only for configs with an explicit ``head_dim`` (Llama-style): BERT and GPT-2
    derive the head size from hidden_size / heads, so their config keeps the original head count."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    changes: dict[str, Any] = {}
    widths = {w for m in model.modules() if (w := patch_mlp(m)) is not None}
    if len(widths) == 1:
        attr = "n_inner" if hasattr(cfg, "n_inner") else "intermediate_size"
        if hasattr(cfg, attr) and getattr(cfg, attr) != (width := widths.pop()):
            changes[attr] = width
    counts = {(h["heads"], h["kv_heads"]) for h in heads.values()}
    if len(counts) == 1 and getattr(cfg, "head_dim", None) and hasattr(cfg, "num_key_value_heads"):
        q, kv = counts.pop()
        if (q, kv) != (cfg.num_attention_heads, cfg.num_key_value_heads):
            changes.update(num_attention_heads=q, num_key_value_heads=kv)
    for attr, value in changes.items():
        setattr(cfg, attr, value)
    return changes
