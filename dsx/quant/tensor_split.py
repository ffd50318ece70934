"""Tensor-parallel splits of a layer's buffers over a 1-D DeviceMesh: which rank keeps which slice, and the collectives.

Quantized linears shard themselves from their own table of split dims (``QuantLinear.shard``); the slicing, the
all-reduces and the state-dict view (global DTensors, as for torch's parallel styles) live here, below dsx.parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

STYLES = ("colwise", "rowwise")
"""``colwise``: the input is replicated, each rank computes its slice of the output features and returns it (local).
``rowwise``: the input is each rank's slice of the features (a colwise layer's output), the output is all-reduced."""
REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def placement(dim: int | None, chunks: int = 1) -> Placement:
    """``Replicate()`` for ``dim=None``; else ``Shard(dim)``, or for a fused projection of ``chunks`` stacked parts
    each rank's slice of every part.

    Args:
        dim: the dim split across the ranks, or None where every rank holds the whole tensor.
        chunks: how many projections a fused layer stacks along ``dim``.

    Returns:
        The DTensor placement.
    """
    if dim is None:
        return Replicate()
    return Shard(dim) if chunks == 1 else _StridedShard(dim, split_factor=chunks)


def distribute(t: torch.Tensor, mesh: DeviceMesh, place: Placement, src_data_rank: int | None = 0) -> DTensor:
    """``distribute_tensor`` from the mesh's ``src_data_rank`` (None: each rank slices its own ``t``, no
    communication); float8, which gloo cannot send, travels as bytes.

    Args:
        t: the whole tensor.
        mesh: the 1-D mesh.
        place: its placement.
        src_data_rank: the mesh rank whose ``t`` is split, None for each rank's own.

    Returns:
        The DTensor over ``mesh``.
    """
    t = t.contiguous()
    if t.dtype.itemsize == 1 and t.is_floating_point():
        raw = distribute_tensor(t.view(torch.uint8), mesh, [place], src_data_rank=src_data_rank)
        return DTensor.from_local(raw.to_local().view(t.dtype), mesh, [place], run_check=False, shape=t.shape,
                                  stride=t.stride())
    return distribute_tensor(t, mesh, [place], src_data_rank=src_data_rank)


@dataclass
class TensorSplit:
    """How a layer is split: its style (``STYLES``), the mesh, and each buffer's placement and whole shape."""

    style: str
    mesh: DeviceMesh
    placements: dict[str, Placement]
    shapes: dict[str, torch.Size]

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """``t`` reduced in place over the mesh's ranks with ``op`` (``"sum"`` or ``"max"``); returns ``t``."""
        dist.all_reduce(t, op=REDUCE_OPS[op], group=self.mesh.get_group())
        return t

    def global_view(self, name: str, local: torch.Tensor) -> DTensor:
        """Buffer ``name``'s local part as a DTensor of the whole shape (sharing its storage; no communication)."""
        shape = self.shapes[name]
        return DTensor.from_local(local, self.mesh, [self.placements[name]], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def local_part(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's part of a value loaded into buffer ``name``: a DTensor's local shard (redistributed when its
        placement differs), a plain tensor of the whole shape sliced here, any other tensor as it is."""
        place = self.placements[name]
        if isinstance(value, DTensor):
            same = tuple(value.placements) == (place,)
            return (value if same else value.redistribute(self.mesh, [place])).to_local()
        if value.shape == self.shapes[name] and not isinstance(place, Replicate):
            return distribute(value, self.mesh, place, src_data_rank=None).to_local()
        return value


def _state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    split: TensorSplit = module.split
    for name in split.placements:
        if state_dict.get(prefix + name) is not None:
            state_dict[prefix + name] = split.global_view(name, state_dict[prefix + name])


def _load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    split: TensorSplit = module.split
    for name in split.placements:
        if state_dict.get(prefix + name) is not None:
            state_dict[prefix + name] = split.local_part(name, state_dict[prefix + name])


def split_buffers(module: nn.Module, style: str, mesh: DeviceMesh, dims: Mapping[str, int | None],
                  chunks: int = 1) -> TensorSplit:
    """Replace ``module``'s buffers, in place, by this rank's part of the mesh rank 0's (a collective: every rank of
    ``mesh`` calls it). ``module.split`` must then hold the result: its ``state_dict`` gives each buffer as a DTensor
    of the whole shape, and ``load_state_dict`` takes those, or whole plain tensors, back.

    Args:
        module: the layer; every buffer it holds must be named in ``dims``.
        style: ``"colwise"`` or ``"rowwise"`` (recorded; ``dims`` says what is split).
        mesh: a 1-D DeviceMesh.
        dims: buffer name -> the dim split across the ranks, or None where every rank keeps all of it.
        chunks: how many projections a fused layer stacks along its split dims (each rank gets a slice of each).

    Returns:
        The ``TensorSplit`` describing the split.

    Raises:
        ValueError: an unknown style, a mesh that is not 1-D, or a split dim not divisible by the ranks.
        TypeError: ``mesh`` is not a DeviceMesh, or a buffer has no entry in ``dims``.
    """
    if style not in STYLES:
        raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh: expected a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"mesh: a split needs a 1-D DeviceMesh, got a {mesh.ndim}-D mesh of shape {tuple(mesh.shape)}")
    buffers = dict(module.named_buffers(recurse=False))
    unknown = sorted(set(buffers) - set(dims))
    if unknown:
        raise TypeError(f"{type(module).__name__} cannot be split {style}: no split dim for its buffers {unknown}")
    for name, t in buffers.items():
        dim = dims[name]
        if dim is not None and t.shape[dim] % (mesh.size() * chunks):
            raise ValueError(f"{type(module).__name__}.{name}: dim {dim} of size {t.shape[dim]} is not divisible by "
                             f"{chunks} part(s) x {mesh.size()} ranks")
    split = TensorSplit(style, mesh, {n: placement(dims[n], chunks) for n in buffers},
                        {n: t.shape for n, t in buffers.items()})
    for name, t in buffers.items():
        setattr(module, name, distribute(t, mesh, split.placements[name]).to_local())
    module.register_state_dict_post_hook(_state_dict_hook)
    module.register_load_state_dict_pre_hook(_load_hook)
    return split
