"""Graph pass fusing ``softmax(x * c + mask, -1)`` (scale and/or additive mask) into ``dsx::scaled_masked_softmax``.

Attention scores left outside SDPA are otherwise scaled, masked and normalized in three passes over memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

import dsx.kernels.softmax  # noqa: F401  (registers torch.ops.dsx.scaled_masked_softmax)
from dsx.graph.fx_utils import arg, erase_dead, is_call, only_user, tensor_meta
from dsx.graph.pass_manager import register

aten = torch.ops.aten


def _scaled(node: Any, user: fx.Node) -> tuple[fx.Node, float] | None:
    """``(x, scale)`` when ``node`` is ``x * c`` or ``x / c`` (c a finite non-zero number) read only by ``user``."""
    if not is_call(node, aten.mul.Tensor, aten.div.Tensor) or node.kwargs or only_user(node) is not user:
        return None
    x, c = node.args
    if not isinstance(x, fx.Node) or isinstance(c, bool) or not isinstance(c, (int, float)):
        return None
    if not math.isfinite(c) or c == 0:
        return None
    return x, float(c) if node.target == aten.mul.Tensor else 1.0 / c


def _broadcasts_to(mask: Any, shape: torch.Size) -> bool:
    """Whether ``mask`` holds a floating tensor that broadcasts to ``shape`` without enlarging it."""
    val = tensor_meta(mask)
    if val is None or not val.dtype.is_floating_point or val.dim() > len(shape):
        return False
    return all(m in (1, n) for m, n in zip(reversed(val.shape), reversed(shape)))


def _operands(inp: Any, softmax: fx.Node) -> tuple[fx.Node, fx.Node | None, float, list[fx.Node]] | None:
    """``(x, mask, scale, pattern nodes)`` for a softmax input ``x * c``, ``x * c + mask`` or ``x + mask``."""
    scaled = _scaled(inp, softmax)
    if scaled is not None:
        return scaled[0], None, scaled[1], [inp]
    if not is_call(inp, aten.add.Tensor) or len(inp.args) != 2 or inp.kwargs or only_user(inp) is not softmax:
        return None
    shape = tensor_meta(inp).shape
    for a, mask in (inp.args, inp.args[::-1]):
        if not _broadcasts_to(mask, shape):
            continue
        scaled = _scaled(a, inp)
        if scaled is not None:
            return scaled[0], mask, scaled[1], [a, inp]
        if isinstance(a, fx.Node) and getattr(tensor_meta(a), "shape", None) == shape:
            return a, mask, 1.0, [inp]
    return None


@register("scaled_masked_softmax", kernel=True)
def scaled_masked_softmax(gm: fx.GraphModule) -> int:
    """Fuse ``softmax(x * c + mask, -1)``, ``softmax(x * c, -1)``, ``softmax(x + mask, -1)`` into one dsx op."""
    count = 0
    for softmax in list(gm.graph.nodes):
        if not is_call(softmax, aten.softmax.int):
            continue
        inp, out = softmax.args[0], tensor_meta(softmax)
        in_val = tensor_meta(inp)
        if in_val is None or out is None or arg(softmax, 1, "dim") not in (-1, in_val.dim() - 1):
            continue
        if arg(softmax, 2, "dtype") not in (None, in_val.dtype):
            continue
        match = _operands(inp, softmax)
        if match is None:
            continue
        x, mask, scale, pattern = match
        x_val = tensor_meta(x)
        if x_val is None or x_val.shape != in_val.shape or not x_val.dtype == in_val.dtype == out.dtype:
            continue
        with gm.graph.inserting_before(softmax):
            fused = gm.graph.call_function(torch.ops.dsx.scaled_masked_softmax.default, (x, mask, scale))
        fused.meta["val"] = softmax.meta["val"]
        softmax.replace_all_uses_with(fused)
        erase_dead(gm, [*pattern, softmax])
        count += 1
    return count
