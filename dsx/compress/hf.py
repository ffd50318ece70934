"""Unit layouts for structured pruning: which weight dims hold which heads or neurons, and the attributes forward reads.

Matched by structure (projection names and head attributes), so BERT-, GPT-2- and q/k/v/o-style attention of Hugging
Face transformers (Llama / Mistral / Qwen under grouped-query attention: whole KV groups; ViT, OPT, CLIP, Wav2Vec2)
prune whole heads; ``dsx.compress.hf_layouts`` adds fused projections, MoE experts, DeBERTa-v2 and T5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dsx.core.modules import is_hf_conv1d


@dataclass(frozen=True)
class HeadSlice:
    """A dim of ``module.tensor`` (``module`` "": the unit itself) laid out as sections, each [unit 0 ... unit n-1]
    with ``repeats[i]`` positions per unit, then ``fixed`` positions that belong to no unit and stay."""

    module: str
    tensor: str
    dim: int
    repeats: tuple[int, ...]
    fixed: int = 0

    def positions(self, units: np.ndarray) -> np.ndarray:
        """The unit id at each position of the dim (-1 where fixed), given the ids of the units."""
        sections = [np.repeat(units, r) for r in self.repeats]
        return np.concatenate([*sections, np.full(self.fixed, -1, dtype=np.int64)])

    def size(self, units: int) -> int:
        """The length of the dim for ``units`` units."""
        return units * sum(self.repeats) + self.fixed


@dataclass(frozen=True)
class HeadLayout:
    """How one module traced as a unit (attention, a fused MLP, MoE experts) stores its pruning units: heads, KV
    groups with their query heads, or MLP neurons.

    ``inputs``: (module, tensor, dim, source) dims that read the hidden states (``source``: see ``unit_input``);
    ``outputs``: the output projection's (module, tensor, dim) holding the hidden size, its weight first; empty when
    it lives outside and the module returns the units themselves; ``head_inputs``: keyword arguments [batch, heads,
    ...] that must keep the same heads (T5's position bias, shared by all layers); ``reason``: why none of the units
    may go (ALiBi slopes, MoE routers), or None; ``multiple``: unit counts kept stay multiples of it.
    """

    units: int
    heads_per_unit: int
    head_dim: int
    inputs: tuple[tuple[str, str, int, str | int], ...]
    heads: tuple[HeadSlice, ...]
    outputs: tuple[tuple[str, str, int], ...] = ()
    head_inputs: tuple[str, ...] = ()
    reason: str | None = None
    multiple: int = 1

    def fits(self, module: nn.Module) -> bool:
        """Every head slice matches its tensor's size, and no parameter the layout leaves out has a dim the size of
        the heads (Swin's relative position bias table, OLMo-2's norm over all query heads): a module that only looks
        like the layout does not fit."""
        named = [getattr(module.get_submodule(m), t, None) for m, t, *_ in self.inputs + self.outputs]
        named += [getattr(module.get_submodule(s.module), s.tensor, None) for s in self.heads]
        sizes = {self.units * self.heads_per_unit} | {s.size(self.units) for s in self.heads}
        if any(not any(p is t for t in named) and sizes & set(p.shape) for p in module.parameters()):
            return False
        return all(isinstance(t, torch.Tensor) and t.dim() > s.dim and t.shape[s.dim] == s.size(self.units)
                   for s, t in zip(self.heads, named[-len(self.heads):]))


def linears(module: nn.Module, *names: str) -> bool:
    """``module`` has an ``nn.Linear`` under each of ``names``."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def is_int(module: nn.Module, name: str) -> bool:
    """``module.<name>`` is an int (not a bool)."""
    return isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool)


def unit_input(source: str | int, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The argument a layout's input reads (None when not passed): ``source`` "q" is the module's input
    (``args[0]``), "kv" the key/value input (cross-attention's encoder states, else the input), a str the keyword
    argument of that name, an int the positional argument at that index."""
    if source == "kv":
        return next((kwargs[k] for k in ("encoder_hidden_states", "key_value_states")
                     if isinstance(kwargs.get(k), torch.Tensor)), args[0])
    if source == "q":
        return args[0]
    return (args[source] if len(args) > source else None) if isinstance(source, int) else kwargs.get(source)


def out_slices(module: nn.Module, names: tuple[str, ...], dim: int, repeats: tuple[int, ...],
               fixed: int = 0) -> list[HeadSlice]:
    """The unit-ordered output dim of each named projection: its weight ``dim`` and its bias, when it has one."""
    slices = []
    for n in names:
        slices.append(HeadSlice(n, "weight", dim, repeats, fixed))
        if getattr(getattr(module, n), "bias", None) is not None:
            slices.append(HeadSlice(n, "bias", 0, repeats, fixed))
    return slices


def out_proj(name: str, dim: int) -> tuple[tuple[str, str, int], ...]:
    """The hidden-size output of projection ``name``: its weight ``dim`` and its bias."""
    return (name, "weight", dim), (name, "bias", 0)


def qkv_inputs(q: str, k: str, v: str) -> tuple[tuple[str, str, int, str], ...]:
    """The input dims of separate query / key / value linears: the query reads the hidden states, key and value
    the key/value input (the same, except in cross-attention)."""
    return (q, "weight", 1, "q"), (k, "weight", 1, "kv"), (v, "weight", 1, "kv")


def head_layout(module: nn.Module) -> HeadLayout | None:
    """The head layout of a supported attention module, None for anything else."""
    if linears(module, "query", "key", "value") and is_int(module, "attention_head_size") \
            and is_int(module, "num_attention_heads"):  # BERT / RoBERTa: the output projection lives outside
        d = module.attention_head_size
        return HeadLayout(module.query.out_features // d, 1, d, qkv_inputs("query", "key", "value"),
                          tuple(out_slices(module, ("query", "key", "value"), 0, (d,))))
    fused = is_hf_conv1d(getattr(module, "c_attn", None)) and is_hf_conv1d(getattr(module, "c_proj", None))
    if fused and is_int(module, "head_dim") and is_int(module, "split_size") \
            and not getattr(module, "is_cross_attention", False):  # GPT-2: one Conv1D holds q | k | v
        d = module.head_dim
        heads = out_slices(module, ("c_attn",), 1, (d, d, d)) + [HeadSlice("c_proj", "weight", 0, (d,))]
        return HeadLayout(module.split_size // d, 1, d, (("c_attn", "weight", 0, "q"),), tuple(heads),
                          out_proj("c_proj", 1))
    out = next((n for n in ("o_proj", "out_proj") if linears(module, n)), None)
    if out and linears(module, "q_proj", "k_proj", "v_proj") and is_int(module, "head_dim"):
        # Llama / Mistral / Qwen / GPT-OSS (a unit is a KV head with its query heads), ViT, OPT, CLIP, Wav2Vec2
        d = module.head_dim
        rep = module.num_key_value_groups if is_int(module, "num_key_value_groups") else 1
        heads = out_slices(module, ("q_proj",), 0, (rep * d,)) + out_slices(module, ("k_proj", "v_proj"), 0, (d,))
        heads.append(HeadSlice(out, "weight", 1, (rep * d,)))
        if isinstance(getattr(module, "sinks", None), nn.Parameter):  # GPT-OSS: one attention sink per head
            heads.append(HeadSlice("", "sinks", 0, (rep,)))
        return HeadLayout(module.k_proj.out_features // d, rep, d, qkv_inputs("q_proj", "k_proj", "v_proj"),
                          tuple(heads), out_proj(out, 0))
    return None


def patch_heads(module: nn.Module) -> dict[str, int]:
    """Set the head counts ``module.forward`` reads from its (already shrunk) weights; return them."""
    if linears(module, "query", "key", "value"):
        heads = module.query.out_features // module.attention_head_size
        module.num_attention_heads = heads
        module.all_head_size = heads * module.attention_head_size
        return {"heads": heads, "kv_heads": heads}
    if is_hf_conv1d(getattr(module, "c_attn", None)):
        heads = module.c_attn.nf // (3 * module.head_dim)
        module.num_heads = heads
        module.split_size = heads * module.head_dim
        return {"heads": heads, "kv_heads": heads}
    heads = module.q_proj.out_features // module.head_dim
    kv_heads = module.k_proj.out_features // module.head_dim
    for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if is_int(module, attr):
            setattr(module, attr, value)
    return {"heads": heads, "kv_heads": kv_heads}


_MLPS = (("up_proj", "down_proj"), ("gate_up_proj", "down_proj"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"),
         ("wi", "wo"), ("wi_0", "wo"), ("intermediate_dense", "output_dense"))
"""(input, output) projection names of the MLP blocks whose width ``patch_mlp`` reads."""
_WIDTHS = ("n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "intermediate_size")
"""Config attributes holding the MLP width, by architecture (GPT-2, OPT, Falcon, T5, the rest)."""


def patch_mlp(module: nn.Module) -> int | None:
    """The intermediate width of an MLP block or of MoE experts (None for other modules), also set as its
    ``intermediate_size`` attribute where it has one."""
    for up, down in _MLPS:
        if linears(module, up, down):
            width = getattr(module, down).in_features
            if is_int(module, "intermediate_size"):
                module.intermediate_size = width
            return width
    if type(module).__name__.endswith("Intermediate") and linears(module, "dense"):
        return module.dense.out_features
    if is_hf_conv1d(getattr(module, "c_fc", nn.Identity())):
        return module.c_fc.nf
    if isinstance(getattr(module, "down_proj", None), nn.Parameter):  # MoE experts as 3-D tensors, patched before
        return next((getattr(module, a) for a in ("intermediate_dim", "intermediate_size") if is_int(module, a)), None)
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
        attr = next((a for a in _WIDTHS if hasattr(cfg, a)), None)
        if attr is not None and getattr(cfg, attr) != (width := widths.pop()):
            changes[attr] = width
    counts = {(h["heads"], h["kv_heads"]) for h in heads.values()}
    if len(counts) == 1 and vars(cfg).get("head_dim") and hasattr(cfg, "num_key_value_heads"):
        q, kv = counts.pop()
        if (q, kv) != (cfg.num_attention_heads, cfg.num_key_value_heads):
            changes.update(num_attention_heads=q, num_key_value_heads=kv)
    for attr, value in changes.items():
        setattr(cfg, attr, value)
    return changes
