"""``dsx.sparsify`` / ``dsx.Sparsify``: 2:4 semi-structured sparsity, two zeros in every four weights along the input.

Masked dense everywhere (fine-tuning keeps the pattern); on Ampere+ GPUs fp16 / bf16 linears also run the
``torch.sparse.to_sparse_semi_structured`` kernels at inference.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrize import type_before_parametrizations
from torch.sparse import to_sparse_semi_structured

from dsx.compress.masks import apply_mask, get_mask, remove_mask, source
from dsx.compress.prune import check_max_error
from dsx.core.checks import check_names
from dsx.compress.unstructured import select_layers
from dsx.core.inputs import Inputs
from dsx.core.transform import Transform
from dsx.quant.quantize import quantized_module

PATTERNS = ("2:4",)
MIN_ROWS, MIN_COLS = 32, 64
"""``to_sparse_semi_structured`` takes 2-D weights whose (rows, cols) are multiples of (and at least) these: the
strictest of torch's CUTLASS and cuSPARSELt rules for float16 / bfloat16 (torch/sparse/semi_structured.py)."""

_COMPRESSED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, torch.Tensor]] = weakref.WeakKeyDictionary()


def check_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights along the input dimension (dim 1) has at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach().reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Keep-mask (True = kept) of the 2 largest |w| in each group of 4 along the input dimension."""
    groups = weight.detach().abs().float().reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def shape_reason(weight: torch.Tensor) -> str | None:
    """Why a weight cannot take the 2:4 kernels' layout, None when it can."""
    rows, cols = weight.shape
    rule = f"2:4 sparse kernels need in_features a multiple of {MIN_COLS} and out_features a multiple of {MIN_ROWS}"
    if cols < MIN_COLS or cols % MIN_COLS:
        return f"in_features {cols} is not a multiple of {MIN_COLS} ({rule})"
    if rows < MIN_ROWS or rows % MIN_ROWS:
        return f"out_features {rows} is not a multiple of {MIN_ROWS} ({rule})"
    return None


def compressed(module: nn.Module) -> torch.Tensor:
    """The ``to_sparse_semi_structured`` form of ``module.weight``, cached until the weight or its mask changes."""
    mask = get_mask(module)
    key = tuple((t.data_ptr(), t._version) for t in (source(module), *([] if mask is None else [mask])))
    hit = _COMPRESSED.get(module)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, to_sparse_semi_structured(module.weight.detach().contiguous()))
        _COMPRESSED[module] = hit
    return hit[1]


class SemiSparseLinear(nn.Linear):
    """``nn.Linear`` whose inference runs the CUDA 2:4 kernels on a compressed copy of its masked weight (rebuilt
    when the weight changes): in eval mode or without autograd, unless the input needs a gradient. Training (train
    mode with trainable weights), the state dict and every read of ``weight`` stay dense; inputs and bias of another
    dtype than the weight's are cast to it and the output back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trained = self.training and (source(self).requires_grad or (self.bias is not None and self.bias.requires_grad))
        if torch.is_grad_enabled() and (x.requires_grad or trained):
            return super().forward(x)
        w = compressed(self)
        bias = None if self.bias is None else self.bias.to(w.dtype)
        out = F.linear(x.reshape(-1, x.shape[-1]).to(w.dtype).contiguous(), w, bias).to(x.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _set_class(module: nn.Module, cls: type[nn.Module]) -> None:
    mask = get_mask(module).clone()
    remove_mask(module, fold=False)
    module.__class__ = cls
    apply_mask(module, mask)


def accelerate_reason(module: nn.Module) -> str | None:
    """Why a masked linear cannot run the CUDA 2:4 kernels here, None when it can."""
    weight = source(module)
    if not weight.is_cuda:
        return "weights are not on a CUDA device"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "2:4 sparse kernels need a GPU of compute capability 8.0 or newer"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 sparse kernels take float16 / bfloat16 weights, not {weight.dtype}"
    if type_before_parametrizations(module) not in (nn.Linear, SemiSparseLinear):
        return f"only plain nn.Linear modules are accelerated, not {type_before_parametrizations(module).__name__}"
    return None


def accelerate(module: nn.Module) -> str | None:
    """Make a masked linear a ``SemiSparseLinear`` (compressing its weight once now); the reason when it cannot."""
    if (reason := accelerate_reason(module)) is not None:
        return reason
    plain = type_before_parametrizations(module)
    _set_class(module, SemiSparseLinear)
    try:
        compressed(module)
    except RuntimeError as e:
        _set_class(module, plain)
        return f"to_sparse_semi_structured failed: {e}"
    return None


@dataclass
class Sparsify(Transform):
    """Give ``nn.Linear`` weights a magnitude 2:4 pattern: in each group of 4 weights along the input dimension keep
    the 2 largest |w|. Masks (``dsx.compress.masks``) keep the pattern through fine-tuning; apply it before
    ``dsx.quantize``, which then quantizes the masked weights (zeros stay zero).

    Layers whose shape the 2:4 kernels cannot take (see ``MIN_ROWS`` / ``MIN_COLS``) are left dense, with the reason
    in the info. ``accelerate`` (None = when possible) runs float16 / bfloat16 layers on CUDA GPUs of compute
    capability 8.0+ through ``torch.sparse.to_sparse_semi_structured`` at inference; True makes it an error when a
    layer cannot be. ``skip`` lists module names or ``"re:<regex>"`` patterns. The tolerance is infinite unless
    ``max_error`` sets one (2:4 changes outputs by design); outputs are still checked for shape and finiteness.
    ``layers`` names exactly the modules to sparsify (the history records it, and ``dsx.load`` replays it).
    """

    name = "sparsify"
    stage = "prune"  # a pruning pattern: distillation (sparse fine-tuning) and quantization may follow it

    pattern: str = "2:4"
    skip: Sequence[str] = ()
    accelerate: bool | None = None
    max_error: float | None = None
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern: supported sparsity patterns are {PATTERNS}, got {self.pattern!r}")
        self.skip = check_names("skip", self.skip)
        if self.layers is not None:
            self.layers = check_names("layers", self.layers, patterns=False)
        if self.accelerate not in (None, True, False):
            raise TypeError(f"accelerate: expected True, False or None (when possible), got {self.accelerate!r}")
        check_max_error(self.max_error)
        self._resolved: list[str] | None = None

    def config(self) -> dict[str, Any]:
        settings = {"pattern": self.pattern, "accelerate": self.accelerate, "max_error": self.max_error}
        if self._resolved is not None:
            return {**settings, "layers": list(self._resolved)}
        return {**settings, "skip": list(self.skip), "layers": self.layers}

    def tolerance_for(self, dtype: torch.dtype) -> float:
        return math.inf if self.max_error is None else self.max_error

    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        if (done := quantized_module(model)) is not None:
            raise ValueError(f"sparsify: the model is already quantized ({done}); sparsify the float model, then "
                             "quantize it")
        chosen, skipped = select_layers(model, lambda m: isinstance(m, nn.Linear), self.skip, self.layers, "sparsify")
        for name in list(chosen):
            if (reason := shape_reason(source(chosen[name]))) is not None:
                if self.layers is not None:
                    raise ValueError(f"layers: {name!r} cannot take the 2:4 pattern: {reason}")
                skipped[name] = reason
                del chosen[name]
        for m in chosen.values():
            apply_mask(m, torch.ones_like(source(m), dtype=torch.bool) if self.replay else mask_2to4(m.weight))
        accelerated = [name for name, m in chosen.items() if self.accelerate is not False and self._speed(name, m)]
        self._resolved = sorted(chosen)
        info = {"pattern": self.pattern, "sparsified": len(chosen), "accelerated": accelerated, "skipped": skipped}
        if chosen:
            kept = sum(int(get_mask(m).sum()) for m in chosen.values())
            info["sparsity"] = round(1.0 - kept / sum(get_mask(m).numel() for m in chosen.values()), 4)
        return model, info

    def _speed(self, name: str, module: nn.Module) -> bool:
        reason = accelerate(module)
        if reason is not None and self.accelerate:
            if not self.replay:
                raise ValueError(f"accelerate: layer {name!r} cannot run the 2:4 sparse kernels: {reason}; pass "
                                 "accelerate=None to accelerate only the layers that can")
            warnings.warn(f"sparsify: layer {name!r} stays masked dense: {reason}", stacklevel=2)
        return reason is None


def sparsify(model: nn.Module, pattern: str = "2:4", *, skip: Sequence[str] = (), example_inputs: Any = None,
             accelerate: bool | None = None, max_error: float | None = None, inplace: bool = False,
             verify: bool = True) -> nn.Module:
    """Give ``model``'s linear weights a 2:4 pattern (``dsx.Sparsify(pattern, ...)(model, example_inputs)``).

    Args:
        model: the model to sparsify.
        pattern: the sparsity pattern; ``"2:4"`` (2 of every 4 input weights kept).
        skip: module names or ``"re:<regex>"`` patterns to leave dense (their children too).
        example_inputs: inputs to verify on.
        accelerate: run fp16 / bf16 layers through the semi-structured sparse kernels on CUDA (sm80+); None when
            possible, True makes it an error when a layer cannot be.
        max_error: a tolerance on the output change (none by default: 2:4 changes outputs by design).
        inplace: change ``model`` itself instead of a copy.
        verify: check the outputs' shapes and finiteness (and ``max_error``) on the example inputs.

    Returns:
        The sparse model (masked linears; the info names layers left dense and why).

    Raises:
        ValueError / TypeError: a bad argument, or ``accelerate=True`` where a layer cannot be accelerated.
        dsx.VerificationError: outputs beyond ``max_error`` or non-finite.

    Example:
        >>> sparse = dsx.sparsify(model, "2:4", example_inputs=x)
    """
    return Sparsify(pattern, skip=skip, accelerate=accelerate, max_error=max_error, inplace=inplace,
                    verify=verify)(model, example_inputs)
