"""Graph passes fusing residual add + RMSNorm into ``dsx::add_rms_norm``, and lone RMSNorms into ``dsx::rms_norm``.

Both match ``aten.rms_norm`` and the decomposed Hugging Face ``LlamaRMSNorm`` (cast, pow, mean, rsqrt, mul, weight).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx as fx

import dsx.kernels.add_rms_norm  # noqa: F401  (registers torch.ops.dsx.add_rms_norm / rms_norm)
from dsx.graph.fx_utils import (
    ASSERT, arg, defined_before, erase_dead, fuse_residual, is_call, is_row_vector, other_operand,
    residual_operands, tensor_meta,
)

aten = torch.ops.aten


class RMSNormMatch(NamedTuple):
    """An RMSNorm found in the graph: ``out == dsx.rms_norm(x, weight, eps)``."""

    x: fx.Node
    weight: fx.Node | None
    eps: float
    out: fx.Node
    pattern: list[fx.Node]
    cast: fx.Node | None


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_call(u, ASSERT)]


def _sole_user(node: fx.Node, target: Any) -> fx.Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 and is_call(users[0], target) else None


def _match_aten(node: fx.Node) -> RMSNormMatch | None:
    x, shape, weight, eps = (arg(node, 0, "input"), arg(node, 1, "normalized_shape"), arg(node, 2, "weight"),
                             arg(node, 3, "eps"))
    xv, ov = tensor_meta(x), tensor_meta(node)
    if xv is None or ov is None or ov.dtype != xv.dtype or list(shape) != [xv.shape[-1]]:
        return None
    if not is_row_vector(weight, xv.shape[-1]):
        return None
    return RMSNormMatch(x, weight, float(torch.finfo(xv.dtype).eps if eps is None else eps), node, [node], None)


def _match_decomposed(rsqrt: fx.Node) -> RMSNormMatch | None:
    """``[h = x.to(f32)]; w * (h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)`` anchored at rsqrt."""
    eps_add = rsqrt.args[0]
    if not is_call(eps_add, aten.add.Tensor) or len(_users(eps_add)) != 1 or "alpha" in eps_add.kwargs:
        return None
    mean, eps = eps_add.args if isinstance(eps_add.args[1], (int, float)) else eps_add.args[::-1]
    if not (is_call(mean, aten.mean.dim) and isinstance(eps, (int, float)) and len(_users(mean)) == 1):
        return None
    pow_ = mean.args[0]
    if not (is_call(pow_, aten.pow.Tensor_Scalar) and pow_.args[1] == 2 and len(_users(pow_)) == 1):
        return None
    h = pow_.args[0]
    cast = h if is_call(h, aten.to.dtype) else None
    x = h.args[0] if cast is not None else h
    xv, hv = tensor_meta(x), tensor_meta(h)
    if xv is None or hv is None or hv.dtype != torch.promote_types(xv.dtype, torch.float32):
        return None
    n = xv.shape[-1]
    dims, keepdim = list(arg(mean, 1, "dim") or ()), arg(mean, 2, "keepdim", False)
    if dims not in ([-1], [xv.dim() - 1]) or not keepdim or arg(mean, 3, "dtype") is not None:
        return None
    mul = _sole_user(rsqrt, aten.mul.Tensor)
    if mul is None or other_operand(mul, rsqrt) not in (h, x):
        return None
    pattern, out, weight = [pow_, mean, eps_add, rsqrt, mul], mul, None
    down = _sole_user(out, aten.to.dtype)
    if down is not None:
        pattern.append(down)
        out = down
    if tensor_meta(out).dtype != xv.dtype:  # the normalized value must be rounded to x's dtype before * weight
        return None
    scale = _sole_user(out, aten.mul.Tensor)
    w = None if scale is None else other_operand(scale, out)
    if isinstance(w, fx.Node) and w is not out and is_row_vector(w, n):
        pattern.append(scale)
        weight, out = w, scale
    ov = tensor_meta(out)
    if ov is None or ov.dtype != xv.dtype or ov.shape != xv.shape:
        return None
    return RMSNormMatch(x, weight, float(eps), out, pattern if cast is None else [cast, *pattern], cast)


def match_rms_norm(node: fx.Node) -> RMSNormMatch | None:
    """The RMSNorm anchored at ``node`` (an ``aten.rms_norm`` or the ``rsqrt`` of a decomposed one), or None."""
    if is_call(node, aten.rms_norm.default):
        return _match_aten(node)
    if is_call(node, aten.rsqrt.default):
        return _match_decomposed(node)
    return None


def _bypass_noop_cast(match: RMSNormMatch) -> None:
    """A ``to(float32)`` of an fp32 tensor is the tensor itself: point its other users at the input."""
    if match.cast is not None and tensor_meta(match.cast).dtype == tensor_meta(match.x).dtype:
        match.cast.replace_all_uses_with(match.x)


def add_rms_norm(gm: fx.GraphModule) -> int:
    """Fuse ``add(a, b)`` feeding an RMSNorm over the last dim into ``dsx.add_rms_norm``."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for node in list(order):
        match = match_rms_norm(node)
        if match is None:
            continue
        operands = residual_operands(match.x)
        if operands is None or not defined_before(order, (match.weight,), match.x):
            continue
        _bypass_noop_cast(match)
        fuse_residual(gm, match.x, match.out, torch.ops.dsx.add_rms_norm.default,
                      (*operands, match.weight, match.eps), match.pattern)
        count += 1
    return count


def rms_norm(gm: fx.GraphModule) -> int:
    """Replace each remaining RMSNorm over the last dim (no fusable residual add) with ``dsx.rms_norm``."""
    count = 0
    for node in list(gm.graph.nodes):
        match = match_rms_norm(node)
        if match is None:
            continue
        with gm.graph.inserting_before(match.out):
            fused = gm.graph.call_function(torch.ops.dsx.rms_norm.default, (match.x, match.weight, match.eps))
        fused.meta["val"] = match.out.meta["val"]
        match.out.replace_all_uses_with(fused)
        _bypass_noop_cast(match)
        erase_dead(gm, match.pattern)
        count += 1
    return count
