"""Tensor parallelism over a 1-D DeviceMesh for float and dsx quantized linears (Megatron column / row splits).

Float layers go through torch's ``parallelize_module``; int8 / fp8 layers keep their integer weights and per-channel
scales sharded consistently (DTensor buffers) and run the dsx kernels on their local shard.
"""

from __future__ import annotations

import abc
import copy
import re
from functools import partial
from typing import Any, ClassVar, Mapping

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard
from torch.nn.utils import parametrize

from dsx.kernels.int8_mm import int8_scaled_mm
from dsx.kernels.quantize_fp8 import quantize_fp8_rowwise
from dsx.kernels.quantize_per_token import quantize_per_token
from dsx.quant.linear import LINEARS, FP8Linear, Int8Linear, QuantLinear
from dsx.core.modules import is_hf_conv1d, set_module

STYLES = ("colwise", "rowwise")
"""``colwise``: the input is replicated, each rank computes its slice of the output features and returns it (local).
``rowwise``: the input is each rank's slice of the features (a colwise layer's output), the output is all-reduced."""

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

SHARDED_BUFFERS = {"colwise": {"weight": 0, "weight_scale": 0, "bias": 0}, "rowwise": {"weight": 1, "smooth": 0}}
"""Which dim of each dsx quantized-linear buffer is split; the others (scales of the other side) are replicated."""
KNOWN_BUFFERS = frozenset({"weight", "weight_scale", "bias", "input_scale", "smooth"})


def _placement(dim: int, chunks: int) -> Placement:
    """``Shard(dim)``, or for a fused projection of ``chunks`` stacked parts each rank's slice of every part."""
    return Shard(dim) if chunks == 1 else _StridedShard(dim, split_factor=chunks)


def _distribute(t: torch.Tensor, mesh: DeviceMesh, placement: Placement) -> DTensor:
    """``distribute_tensor`` from the mesh's rank 0 (float8, which gloo cannot send, travels as bytes)."""
    if t.dtype.itemsize == 1 and t.is_floating_point():
        raw = distribute_tensor(t.view(torch.uint8), mesh, [placement], src_data_rank=0)
        return DTensor.from_local(raw.to_local().view(t.dtype), mesh, [placement], run_check=False, shape=t.shape,
                                  stride=t.stride())
    return distribute_tensor(t, mesh, [placement], src_data_rank=0)


def _all_reduce(t: torch.Tensor, op: str, mesh: DeviceMesh) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(t, op, mesh))


def _conv1d(style: ColwiseParallel | RowwiseParallel, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """What torch's linear styles do to an ``nn.Linear``, done to a Hugging Face ``Conv1D``."""
    return distribute_module(module, mesh, style._partition_linear_fn,
                             partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
                             partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))


class _Colwise(ColwiseParallel):
    """``ColwiseParallel`` that also takes Hugging Face ``Conv1D`` (``[in, out]`` weight) and fused projections."""

    def __init__(self, chunks: int = 1) -> None:
        super().__init__()
        self.chunks = chunks

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            dim = 1 if pname == "weight" and is_hf_conv1d(module) else 0
            placement = _placement(dim, self.chunks)
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad))

    @staticmethod
    def _prepare_output_fn(output_layouts: Any, use_local_output: bool, mod: nn.Module, outputs: DTensor,
                           device_mesh: DeviceMesh) -> torch.Tensor:
        return outputs.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, nn.Linear):
            return super()._apply(module, device_mesh)
        return _conv1d(self, module, device_mesh)


class _Rowwise(RowwiseParallel):
    """``RowwiseParallel`` that also takes Hugging Face ``Conv1D`` (``[in, out]`` weight)."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if not is_hf_conv1d(module):
            return super()._partition_linear_fn(name, module, device_mesh)
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = Shard(0) if pname == "weight" else Replicate()
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, nn.Linear):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)
        return _conv1d(self, module, device_mesh)


class _StraightThrough(torch.autograd.Function):
    """The sharded quantized forward with a float backward to the input (as ``QuantLinear`` does unsharded)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: ShardedQuantLinear) -> torch.Tensor:
        ctx.module = module
        return module.quantized_forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.module.input_grad(grad), None


class ShardedQuantLinear(nn.Module, abc.ABC):
    """A dsx quantized linear split over a 1-D mesh. Its buffers keep the original names and global shapes as
    DTensors (``state_dict`` and ``full_tensor()`` give back the unsharded layer); the forward runs the dsx kernels on
    a ``QuantLinear`` of the same class that views each rank's local shards."""

    style: ClassVar[str] = ""

    def __init__(self, module: QuantLinear, mesh: DeviceMesh, chunks: int = 1) -> None:
        super().__init__()
        self.mesh, self.format = mesh, module.format
        self.in_features, self.out_features = module.in_features, module.out_features
        sharded = SHARDED_BUFFERS[self.style]
        for name, t in module._buffers.items():
            placement = _placement(sharded[name], chunks) if name in sharded else Replicate()
            self.register_buffer(name, None if t is None else _distribute(t.contiguous(), mesh, placement))
        local = copy.copy(module)
        local._buffers = dict.fromkeys(module._buffers)
        self.__dict__["_local"] = local

    def shard_module(self) -> QuantLinear:
        """The ``QuantLinear`` over this rank's shards (rowwise: without the bias, added after the all-reduce)."""
        local = self.__dict__["_local"]
        for name in local._buffers:
            t = getattr(self, name)
            local._buffers[name] = t.to_local() if isinstance(t, DTensor) else t
        local.out_features, local.in_features = local.weight.shape
        if self.style == "rowwise":
            local._buffers["bias"] = None
        return local

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, {self.style} over {self.mesh.size()} ranks")

    @abc.abstractmethod
    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x`` with its quantized arithmetic (no autograd wrapping)."""

    @abc.abstractmethod
    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The straight-through gradient with respect to the input, given the output's gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _StraightThrough.apply(x, self)
        return self.quantized_forward(x)


class ColwiseQuantLinear(ShardedQuantLinear):
    """Column split: ``weight`` rows, ``weight_scale`` and ``bias`` sharded along the output features; activation-side
    buffers (``input_scale``, ``smooth``) replicated. Input: the full activation; output: this rank's features."""

    style = "colwise"

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard_module().quantized_forward(x)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad @ self.shard_module().dequantize().to(grad.dtype), "sum", self.mesh)


class RowwiseQuantLinear(ShardedQuantLinear):
    """Row split: ``weight`` columns and ``smooth`` sharded along the input features; ``weight_scale``, ``bias`` and
    ``input_scale`` replicated. Input: this rank's features; each rank's fp32 partial product is all-reduced, then
    the bias added once. Per-token activation scales (``int8``, ``fp8``) come from the all-reduced row maximum, so
    the integers match the unsharded layer exactly."""

    style = "rowwise"

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.shard_module()
        if isinstance(local, (Int8Linear, FP8Linear)):
            out = self._full_row_scaled(local, x)
        else:
            out = local.quantized_forward(x).float()
        out = _all_reduce(out, "sum", self.mesh)
        if self.bias is not None:
            out = out + self.bias.to_local().float()
        return out.to(x.dtype)

    def _full_row_scaled(self, local: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        rows = local._rows(x)
        amax = _all_reduce(rows.abs().amax(-1, keepdim=True).float(), "max", self.mesh).to(rows.dtype)
        # One extra column holding the full row's |max| makes the dsx quantizer use the full row's scale.
        if isinstance(local, Int8Linear):
            q, scale = quantize_per_token(torch.cat([rows, amax], dim=-1))
            out = int8_scaled_mm(q[:, :-1].contiguous(), scale, local.weight.t(), local.weight_scale, None,
                                 torch.float32)
        else:
            q, scale = quantize_fp8_rowwise(torch.cat([rows, amax], dim=-1))
            out = torch._scaled_mm(q[:, :-1].contiguous(), local.weight.t(), scale_a=scale,
                                   scale_b=local.weight_scale.view(1, -1),
                                   out_dtype=torch.bfloat16 if x.is_cuda else torch.float32)
        return out.float().reshape(*x.shape[:-1], local.out_features)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad @ self.shard_module().dequantize().to(grad.dtype)


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer ``tensor_parallel`` can split, None for any other module."""
    if type(module) in LINEARS.values() and set(module._buffers) <= KNOWN_BUFFERS:
        return module.in_features, module.out_features
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
        supported = ["nn.Linear", "transformers Conv1D", *(c.__name__ for c in LINEARS.values())]
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
    """Split ``model``'s linears over the ranks of the 1-D ``mesh``, in place; returns ``model``.

    ``plan`` maps module names (or ``"re:<regex>"`` patterns) to ``"colwise"`` / ``"rowwise"`` (see ``STYLES``);
    None uses ``default_plan(model)``. Pair each colwise layer with a rowwise one after it (what lies between must
    act per feature, such as activations and gating): the block's output is then whole on every rank. ``nn.Linear``
    and Hugging Face ``Conv1D`` go through ``parallelize_module`` (DTensor parameters; a fused ``c_attn`` gives each
    rank its slice of q, k and v); dsx quantized linears become ``ColwiseQuantLinear`` / ``RowwiseQuantLinear``. The
    attention modules of colwise q / k / v get per-rank head counts (``HEAD_ATTRS``). Every rank must call it; the
    weights of the mesh's rank 0 are the ones split. Layers with pruning masks, and QAT modules, are refused.
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
            cls = ColwiseQuantLinear if style == "colwise" else RowwiseQuantLinear
            set_module(model, name, cls(module, mesh, chunks[name]))
        else:
            parallelize_module(module, mesh, _Colwise(chunks[name]) if style == "colwise" else _Rowwise())
    return model
