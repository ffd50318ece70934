"""Graph pass moving a bias add into the activation after it: ``act(y + b)`` -> one ``dsx::bias_act`` node.

Pattern / replacement pairs: a linear bias, ``y + b`` or GPT-2's addmm (+ view), then GELU / SiLU / ReLU or
GPT-2's pow / tanh GELU formula ("gelu_new").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx

import dsx.kernels.bias_act  # noqa: F401  (registers torch.ops.dsx.bias_act)
from dsx.graph.fx_utils import ACTIVATIONS, Rewrite, rewrite, tensor_meta

aten = torch.ops.aten
Fn = Callable[..., Any]


def _gelu_new(y: Any) -> Any:
    """``0.5 * y * (1 + tanh(sqrt(2/pi) * (y + 0.044715 * y**3)))`` as Hugging Face's NewGELUActivation exports."""
    inner = aten.add.Tensor(y, aten.mul.Tensor(aten.pow.Tensor_Scalar(y, 3.0), 0.044715))
    tanh = aten.tanh.default(aten.mul.Tensor(inner, math.sqrt(2.0 / math.pi)))
    return aten.mul.Tensor(aten.mul.Tensor(y, 0.5), aten.add.Tensor(tanh, 1.0))


ACTIVATION_PATTERNS: list[tuple[str, Fn]] = [*ACTIVATIONS.items(), ("gelu_tanh", _gelu_new)]
"""The activations ``dsx.bias_act`` computes: its name for each, and the ATen calls that match it."""

VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _is_bias(b: Any, n: int) -> bool:
    val = tensor_meta(b)
    return val is not None and val.dtype.is_floating_point and tuple(val.shape) == (n,)


def _biased(key: str, same_shape: bool = False) -> Callable[[dict[str, Any], fx.Node], bool]:
    """The check: ``b`` is a float bias over the output's last dim, and the activation's output keeps the dtype
    (and with ``same_shape`` the shape) of the input bound to ``key``."""

    def check(bound: dict[str, Any], out: fx.Node) -> bool:
        val, out_val = tensor_meta(bound[key]), tensor_meta(out)
        if val is None or out_val is None or out_val.dim() == 0 or out_val.dtype != val.dtype:
            return False
        return _is_bias(bound["b"], out_val.shape[-1]) and (not same_shape or out_val.shape == val.shape)

    return check


def _rewrites(name: str, act: Fn) -> list[Rewrite]:
    """Every biased producer followed by ``act``, rewritten to ``dsx.bias_act(unbiased producer, b, name)``."""
    fused = torch.ops.dsx.bias_act.default

    def linear(x: Any, w: Any, b: Any) -> Any:
        return act(aten.linear.default(x, w, b))

    def add(y: Any, b: Any) -> Any:
        return act(aten.add.Tensor(y, b))

    def bias_first(y: Any, b: Any) -> Any:
        return act(aten.add.Tensor(b, y))

    def addmm(b: Any, x: Any, w: Any) -> Any:
        return act(aten.addmm.default(b, x, w))

    def addmm_view(view: Fn) -> Fn:
        def pattern(b: Any, x: Any, w: Any, shape: Any) -> Any:
            return act(view(aten.addmm.default(b, x, w), shape))

        def replacement(bound: dict[str, Any]) -> Fn:
            return lambda b, x, w, shape: fused(view(aten.mm.default(x, w), shape), b, name)

        return Rewrite(pattern, replacement, _biased("x"))

    return [
        Rewrite(linear, lambda _: lambda x, w, b: fused(aten.linear.default(x, w), b, name), _biased("x")),
        Rewrite(add, lambda _: lambda y, b: fused(y, b, name), _biased("y", same_shape=True)),
        Rewrite(bias_first, lambda _: lambda y, b: fused(y, b, name), _biased("y", same_shape=True)),
        *(addmm_view(view) for view in VIEWS),
        Rewrite(addmm, lambda _: lambda b, x, w: fused(aten.mm.default(x, w), b, name), _biased("x")),
    ]


REWRITES = [rw for name, act in ACTIVATION_PATTERNS for rw in _rewrites(name, act)]


def bias_act(gm: fx.GraphModule) -> int:
    """Fuse a bias add (linear bias, ``y + b``, GPT-2 addmm) and the GELU/SiLU/ReLU after it into ``dsx.bias_act``."""
    return rewrite(gm, REWRITES)
