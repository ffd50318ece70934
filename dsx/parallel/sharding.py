"""FSDP2 and DDP for dsx models: pruning / 2:4 masks, QAT scales and weights stay consistent on every rank.

FSDP2 shards parameters only: dsx masks (bool buffers) stay whole on each rank and are sliced to a sharded weight's
placement when the masked weight is read between forwards; QAT's scalar activation scales stay replicated.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from dsx.core.inputs import check_module
from dsx.quant.qat import QATLinear


def check_qat_scales(model: nn.Module) -> None:
    """Refuse QAT static activation scales not set yet: each rank would seed its own from its first batch."""
    unset = [n for n, m in model.named_modules()
             if isinstance(m, QATLinear) and m.input_scale is not None and m.input_scale.item() == 0.0]
    if unset:
        raise ValueError(f"model: QAT layers {unset} have no activation scale yet; calibrate them "
                         "(dsx.quantize(model, 'int8_static', qat=True, calibration=batches)) or run a forward on "
                         "the same batch on every rank before distributing the model")


def prepare_for_ddp(model: nn.Module) -> nn.Module:
    """Check that ``model`` trains the same on every rank under ``DistributedDataParallel``; returns it.

    DDP needs nothing else for dsx: masks are buffers it broadcasts from rank 0, masked weights get zero gradients,
    and QAT scales are parameters whose gradients it averages like any other.
    """
    check_module(model)
    check_qat_scales(model)
    return model


def _broadcast_states(model: nn.Module, mesh: DeviceMesh) -> None:
    """Copy every parameter and buffer from the mesh's rank 0 (as DDP does), so masks and scales agree."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    with torch.no_grad():
        for t in tensors.values():
            raw = t.data.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t.data
            dist.broadcast(raw, group=mesh.get_group(), group_src=0)


def _average_grads(params: set[nn.Parameter], mesh: DeviceMesh) -> None:
    """All-reduce (mean) the gradients of parameters FSDP2 leaves replicated, as each one is accumulated."""
    group = mesh.get_group()

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(group.size())

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def _units(model: nn.Module, units: Sequence[str]) -> list[str]:
    """The module names ``units`` selects (exact names or ``"re:<regex>"``), deepest first as ``fully_shard`` needs."""
    names = [n for n, _ in model.named_modules() if n]
    chosen, missing = set(), []
    for key in units:
        hits = [n for n in names if (re.fullmatch(key[3:], n) if key.startswith("re:") else n == key)]
        if not hits:
            missing.append(key)
        chosen.update(hits)
    if missing:
        raise ValueError(f"units: no module of the model matches {missing}")
    inside = sorted(n for n in chosen if "parametrizations" in n.split("."))
    if inside:
        raise ValueError(f"units: {inside} are inside a parametrization; shard the layer that owns the masked weight")
    return sorted(chosen, key=lambda n: -n.count("."))


def shard(model: nn.Module, mesh: DeviceMesh, *, units: Sequence[str] = (), **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2 (``fully_shard``) for a dsx model over the 1-D ``mesh``, in place; returns ``model``.

    ``units`` names the submodules (or ``"re:<regex>"`` patterns, e.g. ``"re:layers\\.\\d+"``) sharded as their own
    FSDP unit, gathered only around their forward and backward; the root is always one. Before sharding, every
    parameter and buffer is broadcast from the mesh's rank 0 (FSDP2 itself assumes equal ranks; ``module.weight`` of
    a masked layer still reads between forwards, as a masked sharded DTensor), and scalar
    parameters (QAT static activation scales, which ``fully_shard`` refuses) stay replicated with gradients averaged.
    Masks stay whole on each rank (bool, a quarter of an fp32 weight). dsx transforms (``convert``,
    ``make_permanent``, export) take the unsharded model: load ``full_state_dict(model)`` into an unsharded copy.
    """
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        raise ValueError(f"mesh: shard needs a 1-D DeviceMesh, got {mesh!r}")
    check_qat_scales(model)
    names = _units(model, units)
    _broadcast_states(model, mesh)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    ignored = set(fully_shard_kwargs.pop("ignored_params", None) or ()) | scalars
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    _average_grads(scalars, mesh)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, DTensor):
        return t
    if t.dtype.itemsize == 1 and t.is_floating_point():
        raw = DTensor.from_local(t.to_local().view(torch.uint8), t.device_mesh, t.placements, run_check=False,
                                 shape=t.shape, stride=t.stride())
        return raw.full_tensor().view(t.dtype)
    return t.full_tensor()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with whole, plain tensors on every rank (a collective: call it on all of them).

    Takes FSDP2 (``shard``), tensor-parallel (``tensor_parallel``) and DDP models (without the ``module.`` prefix);
    keys and shapes are those of the unsharded model, masks and scales included, ready for ``load_state_dict``.
    """
    check_module(model)
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {k: _full(v) for k, v in inner.state_dict().items()}
