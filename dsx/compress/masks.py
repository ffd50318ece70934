"""Pruning masks as ``torch.nn.utils.parametrize`` parametrizations: the effective weight is ``original * mask``.

Masks stay applied through training (zero gradient on pruned entries), deepcopy, and live in the state dict as
bool buffers, so safetensors and ``dsx.load`` round-trip them; ``make_permanent`` folds them into plain weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.utils import parametrize

from dsx.core.inputs import Inputs
from dsx.core.transform import Transform


class WeightMask(nn.Module):
    """Parametrization multiplying a tensor by a fixed bool ``mask`` (a buffer, so it is saved and loaded).

    A DTensor weight (FSDP2 holds sharded originals between forwards) is masked by the whole mask sliced to the
    weight's placements on each rank, without communication.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if isinstance(weight, DTensor) and not isinstance(self.mask, DTensor):
            return weight * distribute_tensor(self.mask, weight.device_mesh, weight.placements, src_data_rank=None)
        return weight * self.mask


def _chain(module: nn.Module, name: str) -> Any:
    return module.parametrizations[name] if parametrize.is_parametrized(module, name) else None


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The bool mask applied to ``module.<name>`` (True = kept), or None when it is not masked."""
    chain = _chain(module, name)
    return chain[0].mask if chain is not None and isinstance(chain[0], WeightMask) else None


def source(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The stored tensor behind ``module.<name>``: the unmasked original when masked, else the tensor itself."""
    chain = _chain(module, name)
    return chain.original if chain is not None else getattr(module, name)


def apply_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Mask ``module.<name>`` in place with ``mask`` (True = kept), intersected with any mask already there.

    The pruned entries of the stored original are zeroed too, so they stay zero under weight decay and momentum.
    """
    chain = _chain(module, name)
    if chain is not None and get_mask(module, name) is None:
        raise ValueError(f"{type(module).__name__}.{name} already has parametrizations "
                         f"({[type(p).__name__ for p in chain]}); dsx masks cannot be combined with them")
    weight = source(module, name)
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match {name} {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    with torch.no_grad():
        if chain is None:
            parametrize.register_parametrization(module, name, WeightMask(mask))
        else:
            chain[0].mask.logical_and_(mask)
        weight.mul_(get_mask(module, name))


def remove_mask(module: nn.Module, name: str = "weight", *, fold: bool = True) -> None:
    """Drop the mask of ``module.<name>``: ``fold=True`` keeps the masked values, False restores the original."""
    if get_mask(module, name) is None:
        raise ValueError(f"{type(module).__name__}.{name} is not masked")
    # A deepcopy shares the class parametrize injected with the original, and removal deletes the property from
    # that class: give this module a class of its own first, so copies are not broken.
    cls = type(module)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, name, leave_parametrized=fold)


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` with a masked ``weight``, by name."""
    return {n: m for n, m in model.named_modules() if get_mask(m) is not None}


def sparsity(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros in ``tensor``."""
    return 1.0 - tensor.count_nonzero().item() / max(tensor.numel(), 1)


def count_nonzero(model: nn.Module) -> tuple[int, int]:
    """``(parameters, nonzero parameters)`` of ``model``, counting shared tensors once (masked originals hold zeros
    at pruned entries, so this counts the effective weights)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(p.count_nonzero()) for p in params)


@dataclass
class MakePermanent(Transform):
    """Fold every dsx mask into its plain weight (removing the parametrizations): the model then holds ordinary
    ``nn.Linear`` / conv weights with zeros, ready for export. Recorded, so ``dsx.load`` replays it."""

    name = "make_permanent"
    stage = "compress"

    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        names = masked_modules(model)
        for module in names.values():
            remove_mask(module, fold=True)
        return model, {"folded": len(names)}


def make_permanent(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with every pruning / 2:4 mask folded into plain weights (a copy unless ``inplace``)."""
    return MakePermanent(inplace=inplace)(model)
