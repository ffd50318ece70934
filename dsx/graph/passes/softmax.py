"""Graph pass fusing ``softmax(x * c + mask, -1)`` (scale and/or additive mask) into ``dsx::scaled_masked_softmax``.

Attention scores left outside SDPA are otherwise scaled, masked and normalized in three passes over memory.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx

import dsx.kernels.softmax  # noqa: F401  (registers torch.ops.dsx.scaled_masked_softmax)
from dsx.graph.fx_utils import Rewrite, rewrite, tensor_meta

aten = torch.ops.aten


def _scale(bound: dict[str, Any], divide: bool) -> float | None:
    """The scale ``x * c`` (or ``x / c``) applies: c must be a finite non-zero number."""
    c = bound.get("c", 1.0)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c == 0:
        return None
    return 1.0 / c if divide else float(c)


def _broadcasts_to(mask: Any, shape: torch.Size) -> bool:
    """Whether ``mask`` holds a floating tensor that broadcasts to ``shape`` without enlarging it."""
    val = tensor_meta(mask)
    if val is None or not val.dtype.is_floating_point or val.dim() > len(shape):
        return False
    return all(m in (1, n) for m, n in zip(reversed(val.shape), reversed(shape)))


def _checker(divide: bool) -> Callable[[dict[str, Any], fx.Node], bool]:
    """The check: a last-dim softmax that keeps x's shape and dtype, a valid scale, a mask that broadcasts."""

    def check(bound: dict[str, Any], out: fx.Node) -> bool:
        x, in_val, out_val = bound["x"], tensor_meta(out.args[0]), tensor_meta(out)
        x_val = tensor_meta(x)
        if x_val is None or in_val is None or out_val is None or bound["dim"] not in (-1, in_val.dim() - 1):
            return False
        if bound["dtype"] not in (None, in_val.dtype) or _scale(bound, divide) is None:
            return False
        if "mask" in bound and not _broadcasts_to(bound["mask"], in_val.shape):
            return False
        return x_val.shape == in_val.shape and x_val.dtype == in_val.dtype == out_val.dtype

    return check


def _softmax(scores: Any, dim: Any, dtype: Any) -> Any:
    return aten.softmax.int(scores, dim, dtype)


def _scaled_rewrites(scale: Callable[[Any, Any], Any], divide: bool) -> list[Rewrite]:
    """``softmax(scale(x, c) + mask)`` (mask on either side) and ``softmax(scale(x, c))``."""

    def mask_last(x: Any, c: Any, mask: Any, dim: Any, dtype: Any) -> Any:
        return _softmax(aten.add.Tensor(scale(x, c), mask), dim, dtype)

    def mask_first(x: Any, c: Any, mask: Any, dim: Any, dtype: Any) -> Any:
        return _softmax(aten.add.Tensor(mask, scale(x, c)), dim, dtype)

    def unmasked(x: Any, c: Any, dim: Any, dtype: Any) -> Any:
        return _softmax(scale(x, c), dim, dtype)

    def masked(bound: dict[str, Any]) -> Callable[..., Any]:
        return lambda x, c, mask, dim, dtype: FUSED(x, mask, _scale(bound, divide))

    def plain(bound: dict[str, Any]) -> Callable[..., Any]:
        return lambda x, c, dim, dtype: FUSED(x, None, _scale(bound, divide))

    check = _checker(divide)
    return [Rewrite(mask_last, masked, check), Rewrite(mask_first, masked, check), Rewrite(unmasked, plain, check)]


def _mask_last(x: Any, mask: Any, dim: Any, dtype: Any) -> Any:
    return _softmax(aten.add.Tensor(x, mask), dim, dtype)


def _mask_first(x: Any, mask: Any, dim: Any, dtype: Any) -> Any:
    return _softmax(aten.add.Tensor(mask, x), dim, dtype)


def _mask_only(bound: dict[str, Any]) -> Callable[..., Any]:
    return lambda x, mask, dim, dtype: FUSED(x, mask, 1.0)


FUSED = torch.ops.dsx.scaled_masked_softmax.default
REWRITES = [
    *_scaled_rewrites(aten.mul.Tensor, divide=False),
    *_scaled_rewrites(aten.div.Tensor, divide=True),
    Rewrite(_mask_last, _mask_only, _checker(False)),
    Rewrite(_mask_first, _mask_only, _checker(False)),
]
"""Scaled forms first, so an ``x * c + mask`` is fused whole before the mask-only forms see it."""


def scaled_masked_softmax(gm: fx.GraphModule) -> int:
    """Fuse ``softmax(x * c + mask, -1)``, ``softmax(x * c, -1)``, ``softmax(x + mask, -1)`` into one dsx op."""
    return rewrite(gm, REWRITES)
