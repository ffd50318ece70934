"""Graph pass moving a bias add into the activation after it: ``act(y + b)`` -> one ``dsx::bias_act`` node.

Covers linear bias, ``y + b`` and GPT-2's addmm + view, then GELU/SiLU/ReLU or GPT-2's pow/tanh GELU formula.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx

import dsx.kernels.bias_act  # noqa: F401  (registers torch.ops.dsx.bias_act)
from dsx.graph.fx_utils import arg, erase_dead, is_call, only_user, tensor_meta
from dsx.graph.pass_manager import register
from dsx.graph.passes.gated_mlp import activation_name

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _scalar_operand(node: Any, target: Any, value: float) -> Any:
    """``t`` when ``node`` is ``target(t, value)`` or ``target(value, t)`` (value compared to 1e-6), else None."""
    if not is_call(node, target) or len(node.args) != 2 or arg(node, 2, "alpha", 1) != 1:
        return None
    for t, c in (node.args, node.args[::-1]):
        if isinstance(c, (int, float)) and not isinstance(c, bool) and math.isclose(c, value, rel_tol=1e-6):
            return t
    return None


def _other(node: fx.Node, operand: Any) -> Any:
    """The operand of the binary op ``node`` that is not ``operand``."""
    a, b = node.args[:2]
    return b if a is operand else a


def _tanh_gelu(y: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """Match ``0.5 * y * (1 + tanh(sqrt(2/pi) * (y + 0.044715 * y**3)))`` (HF "gelu_new") read only by itself."""
    for half in y.users:
        out = only_user(half)
        if _scalar_operand(half, aten.mul.Tensor, 0.5) is not y or not is_call(out, aten.mul.Tensor):
            continue
        plus_one = _other(out, half)
        tanh = _scalar_operand(plus_one, aten.add.Tensor, 1.0)
        if not is_call(tanh, aten.tanh.default):
            continue
        scaled = tanh.args[0]
        inner = _scalar_operand(scaled, aten.mul.Tensor, _SQRT_2_OVER_PI)
        if not (is_call(inner, aten.add.Tensor) and y in inner.args[:2] and arg(inner, 2, "alpha", 1) == 1):
            continue
        cubic = _other(inner, y)
        cube = _scalar_operand(cubic, aten.mul.Tensor, 0.044715)
        if not (is_call(cube, aten.pow.Tensor_Scalar) and cube.args[0] is y and cube.args[1] == 3):
            continue
        nodes = [half, cube, cubic, inner, scaled, tanh, plus_one, out]
        if set(y.users) == {half, cube, inner} and all(set(n.users) <= set(nodes) for n in nodes[:-1]):
            return out, nodes
    return None


def _activation(y: fx.Node) -> tuple[str, fx.Node, list[fx.Node]] | None:
    """``(act, output, pattern nodes)`` for the activation that is the only reader of ``y``."""
    user = only_user(y)
    act = "relu" if is_call(user, aten.relu.default) else activation_name(user)
    if act is not None and user.args[0] is y:
        return act, user, [user]
    chain = _tanh_gelu(y)
    return None if chain is None else ("gelu_tanh", chain[0], chain[1])


def _is_bias(b: Any, n: int) -> bool:
    val = tensor_meta(b)
    return val is not None and val.dtype.is_floating_point and tuple(val.shape) == (n,)


def _source(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, Callable[[], None]] | None:
    """For a biased producer ``node``: ``(read, y, bias, strip)``: the activation reads ``read``, the fused op takes
    ``y`` and ``bias``, and ``strip()`` rewires the graph so that ``y`` no longer includes the bias."""
    val = tensor_meta(node)
    if val is None or val.dim() == 0:
        return None
    n = val.shape[-1]
    if is_call(node, aten.linear.default) and _is_bias(arg(node, 2, "bias"), n):
        return node, node, arg(node, 2, "bias"), lambda: _drop_linear_bias(node)
    if is_call(node, aten.add.Tensor) and arg(node, 2, "alpha", 1) == 1 and len(node.args) == 2:
        for y, bias in (node.args, node.args[::-1]):
            vy = tensor_meta(y)
            if vy is not None and vy.shape == val.shape and vy.dtype == val.dtype and _is_bias(bias, n):
                return node, y, bias, lambda: None
        return None
    ones = arg(node, 3, "beta", 1) == 1 and arg(node, 4, "alpha", 1) == 1
    if is_call(node, aten.addmm.default) and ones and _is_bias(node.args[0], n):
        view = only_user(node)
        view_val = tensor_meta(view) if is_call(view, *_VIEWS) else None
        read = view if view_val is not None and view_val.shape[-1] == n else node
        return read, read, node.args[0], lambda: _addmm_to_mm(node)
    return None


def _drop_linear_bias(linear: fx.Node) -> None:
    linear.args, linear.kwargs = linear.args[:2], {}


def _addmm_to_mm(addmm: fx.Node) -> None:
    with addmm.graph.inserting_before(addmm):
        mm = addmm.graph.call_function(aten.mm.default, tuple(addmm.args[1:3]))
    mm.meta["val"] = addmm.meta["val"]
    addmm.replace_all_uses_with(mm)


@register("bias_act", kernel=True)
def bias_act(gm: fx.GraphModule) -> int:
    """Fuse a bias add (linear bias, ``y + b``, GPT-2 addmm) and the GELU/SiLU/ReLU after it into ``dsx.bias_act``."""
    count, consumed = 0, set()
    for node in list(gm.graph.nodes):
        source = None if node in consumed else _source(node)
        match = None if source is None else _activation(source[0])
        if match is None or getattr(tensor_meta(match[1]), "dtype", None) != tensor_meta(source[0]).dtype:
            continue
        (_, y, bias, strip), (act, out, pattern) = source, match
        with gm.graph.inserting_before(out):
            fused = gm.graph.call_function(torch.ops.dsx.bias_act.default, (y, bias, act))
        fused.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(fused)
        erase_dead(gm, pattern)
        strip()
        erase_dead(gm, [node])
        consumed.update(pattern)
        count += 1
    return count
