"""Tensor parallelism over a 1-D DeviceMesh for float and dsx quantized linears (Megatron column / row splits).

Float ``nn.Linear`` layers go through torch's ``parallelize_module``; Hugging Face ``Conv1D`` and fused projections
through ``distribute_module``; dsx quantized linears split themselves (``QuantLinear.shard``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.utils import parametrize

from dsx.core.modules import is_hf_conv1d
from dsx.quant.linear import QuantLinear
from dsx.quant.tensor_split import STYLES, placement

DEFAULT_RULES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("q_proj", "k_proj", "v_proj"), ("o_proj", "out_proj")),  # Llama / Mistral / Qwen; OPT / BART / CLIP attention
    (("c_attn",), ("c_proj",)),  # GPT-2 attention (fused q, k, v)
    (("self.query", "self.key", "self.value"), ("output.dense",)),  # BERT / RoBERTa attention
    (("attention.query", "attention.key", "attention.value"), ("output.dense",)),  # ViT attention
    (("gate_proj", "up_proj"), ("down_proj",)),  # gated MLP (Llama)
    (("up_proj",), ("down_proj",)),
    (("fc1",), ("fc2",)),  # OPT / ViT-style / CLIP MLP
    (("c_fc",), ("c_proj",)),  # GPT-2 MLP
    (("intermediate.dense",), ("output.dense",)),  # BERT / ViT MLP
)
"""``default_plan``: in one module, these linears (relative paths) go colwise and the first present of the second
group rowwise. All of them must be there, so a lone ``fc1`` whose output feeds a norm is never split."""

QKV_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn"})
HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "all_head_size", "split_size")
"""Per-rank counts: on the module holding colwise q / k / v, these attributes are divided by the world size."""

def _split_float(module: nn.Module, mesh: DeviceMesh, style: str, chunks: int) -> None:
    """What torch's ``ColwiseParallel`` / ``RowwiseParallel`` do to an ``nn.Linear``, done with public DTensor APIs to
    a Hugging Face ``Conv1D`` (``[in, out]`` weight) or a fused projection of ``chunks`` stacked parts."""
    out_dim, in_dim = (1, 0) if is_hf_conv1d(module) else (0, 1)
    colwise = style == "colwise"
    dims = {"weight": out_dim, "bias": 0} if colwise else {"weight": in_dim, "bias": None}
    layout = Replicate() if colwise else Shard(-1)

    def partition(name: str, mod: nn.Module, device_mesh: DeviceMesh) -> None:
        for pname, param in list(mod.named_parameters(recurse=False)):
            shard = distribute_tensor(param, device_mesh, [placement(dims[pname], chunks)], src_data_rank=0)
            mod.register_parameter(pname, nn.Parameter(shard, requires_grad=param.requires_grad))

    def prepare_input(mod: nn.Module, inputs: tuple[Any, ...], device_mesh: DeviceMesh) -> tuple[Any, ...]:
        return (DTensor.from_local(inputs[0], device_mesh, [layout], run_check=False), *inputs[1:])

    def prepare_output(mod: nn.Module, outputs: DTensor, device_mesh: DeviceMesh) -> torch.Tensor:
        return (outputs if colwise else outputs.redistribute(device_mesh, [Replicate()])).to_local()

    distribute_module(module, mesh, partition, prepare_input, prepare_output)


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer ``tensor_parallel`` can split, None for any other module."""
    if isinstance(module, QuantLinear):
        known = all(set(module._buffers) <= set(dims) for dims in module.SHARD_DIMS.values())
        return (module.in_features, module.out_features) if known and module.split is None else None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hf_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def default_plan(model: nn.Module) -> dict[str, str]:
    """The split of ``model``'s transformer blocks: attention q / k / v (fused GPT-2 ``c_attn`` too) colwise and the
    output projection rowwise; MLP up / gate colwise and down rowwise (``DEFAULT_RULES`` lists the names: Llama,
    Mistral, Qwen, OPT, BART, CLIP, GPT-2, BERT, RoBERTa, ViT). Embeddings, norms and heads stay replicated."""
    plan: dict[str, str] = {}
    for name, parent in model.named_modules():
        prefix = f"{name}." if name else ""

        def linear(path: str) -> bool:
            try:
                return _linear_dims(parent.get_submodule(path)) is not None
            except AttributeError:
                return False

        for cols, rows in DEFAULT_RULES:
            row = next((r for r in rows if linear(r)), None)
            if row is not None and all(linear(c) for c in cols):
                plan.update({prefix + c: "colwise" for c in cols})
                plan[prefix + row] = "rowwise"
    return plan


def _check_mesh(mesh: Any) -> int:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh: expected a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"mesh: tensor_parallel needs a 1-D DeviceMesh, got a {mesh.ndim}-D mesh of shape "
                         f"{tuple(mesh.shape)}; pass the tensor-parallel dimension, e.g. mesh['tp']")
    return mesh.size()


def _resolve(model: nn.Module, plan: Mapping[str, str]) -> dict[str, str]:
    """Module name -> style for every module a plan key names (exactly, or ``"re:<regex>"`` matching the whole name)."""
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan: expected a mapping of module names to {STYLES}, got {type(plan).__name__}")
    names = [n for n, _ in model.named_modules() if n]
    chosen: dict[str, str] = {}
    missing = []
    for key, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"plan: {key!r} has style {style!r}; expected one of {STYLES}")
        hits = [n for n in names if (re.fullmatch(key[3:], n) if key.startswith("re:") else n == key)]
        if not hits:
            missing.append(key)
        for n in hits:
            if chosen.setdefault(n, style) != style:
                raise ValueError(f"plan: {n!r} is named both colwise and rowwise")
    if missing:
        raise ValueError(f"plan: no module of the model matches {missing}")
    return chosen


def _chunks(model: nn.Module, name: str, out_features: int) -> int:
    """How many projections a fused layer stacks (GPT-2 ``c_attn``: ``out_features / split_size``), else 1."""
    parent, _, leaf = name.rpartition(".")
    split = getattr(model.get_submodule(parent), "split_size", None)
    if leaf == "c_attn" and isinstance(split, int) and split and out_features % split == 0:
        return out_features // split
    return 1


def _check_layer(model: nn.Module, name: str, style: str, world: int) -> int:
    """Validate one planned layer; its fused ``chunks``."""
    module = model.get_submodule(name)
    if parametrize.is_parametrized(module):
        raise ValueError(f"plan: {name!r} has parametrizations (dsx pruning / 2:4 masks); fold them into the weights "
                         "first with dsx.make_permanent")
    dims = _linear_dims(module)
    if dims is None:
        supported = ["nn.Linear", "transformers Conv1D", "dsx int8 / fp8 quantized linears"]
        raise TypeError(f"plan: {name!r} is a {type(module).__name__}; tensor_parallel splits {supported}")
    in_features, out_features = dims
    chunks = _chunks(model, name, out_features) if style == "colwise" else 1
    if style == "colwise" and out_features % (world * chunks):
        parts = f" ({chunks} fused parts of {out_features // chunks})" if chunks > 1 else ""
        raise ValueError(f"plan: {name!r} (colwise) has out_features={out_features}{parts}, not divisible by the "
                         f"{world} ranks of the mesh")
    if style == "rowwise" and in_features % world:
        raise ValueError(f"plan: {name!r} (rowwise) has in_features={in_features}, not divisible by the {world} ranks "
                         "of the mesh")
    return chunks


def _head_updates(model: nn.Module, splits: dict[str, str], chunks: dict[str, int],
                  world: int) -> list[tuple[nn.Module, str, int]]:
    """``(attention module, attribute, per-rank value)`` for the head counts of attentions with colwise q / k / v."""
    updates: dict[tuple[int, str], tuple[nn.Module, str, int]] = {}
    for name, style in splits.items():
        parent_name, _, leaf = name.rpartition(".")
        if style != "colwise" or leaf not in QKV_NAMES:
            continue
        parent = model.get_submodule(parent_name)
        head_dim = getattr(parent, "head_dim", getattr(parent, "attention_head_size", None))
        width = _linear_dims(model.get_submodule(name))[1] // chunks[name]
        if isinstance(head_dim, int) and head_dim and width % (head_dim * world):
            raise ValueError(f"plan: {name!r} has {width // head_dim} heads of {head_dim}, which cannot be split over "
                             f"the {world} ranks of the mesh")
        for attr in HEAD_ATTRS:
            value = getattr(parent, attr, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value % world:
                raise ValueError(f"plan: {parent_name}.{attr} = {value} is not divisible by the {world} ranks of the "
                                 "mesh")
            updates[(id(parent), attr)] = (parent, attr, value // world)
    return list(updates.values())


def tensor_parallel(model: nn.Module, mesh: DeviceMesh, plan: Mapping[str, str] | None = None) -> nn.Module:
    """Split ``model``'s linears over the ranks of the 1-D ``mesh``, in place (every rank must call it; the weights
    of the mesh's rank 0 are the ones split).

    Pair each colwise layer with a rowwise one after it (what lies between must act per feature, such as activations
    and gating): the block's output is then whole on every rank. ``nn.Linear`` and Hugging Face ``Conv1D`` get
    DTensor parameters (a fused ``c_attn`` gives each rank its slice of q, k and v); dsx quantized linears split
    themselves (``QuantLinear.shard``). The attention modules of colwise q / k / v get per-rank head counts
    (``HEAD_ATTRS``).

    Args:
        model: the model to split.
        mesh: a 1-D DeviceMesh (e.g. ``mesh["tp"]``).
        plan: module names (or ``"re:<regex>"`` patterns) -> ``"colwise"`` / ``"rowwise"`` (``STYLES``); None uses
            ``default_plan(model)``.

    Returns:
        ``model``.

    Raises:
        TypeError: ``mesh`` is not a DeviceMesh, or a planned module is not a linear it can split (QAT modules too).
        ValueError: a bad plan or mesh, layers with pruning masks, or sizes not divisible by the ranks.

    Example:
        >>> mesh = init_device_mesh("cuda", (world_size,))
        >>> model = dsx.parallel.tensor_parallel(dsx.quantize(model, "int8"), mesh)
    """
    world = _check_mesh(mesh)
    splits = _resolve(model, default_plan(model) if plan is None else plan)
    if not splits:
        raise ValueError("plan: the default plan found no transformer attention or MLP layers it knows "
                         f"(DEFAULT_RULES) in {type(model).__name__}; pass plan={{name: 'colwise' | 'rowwise'}}")
    chunks = {name: _check_layer(model, name, style, world) for name, style in splits.items()}
    for parent, attr, value in _head_updates(model, splits, chunks, world):
        setattr(parent, attr, value)
    for name, style in splits.items():
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            module.shard(style, mesh, chunks[name])
        elif isinstance(module, nn.Linear) and chunks[name] == 1:
            parallelize_module(module, mesh, ColwiseParallel() if style == "colwise" else RowwiseParallel())
        else:
            _split_float(module, mesh, style, chunks[name])
    return model
