"""Graph pass fusing the gated MLP product ``act(a) * b`` (SwiGLU / GeGLU) into one ``dsx::gated_act`` node.

Llama-style MLPs compute ``down(act(gate(x)) * up(x))``; the fused op never stores ``act(gate(x))``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

import dsx.kernels.gated_act  # noqa: F401  (registers torch.ops.dsx.gated_act)
from dsx.graph.fx_utils import ACTIVATIONS, Rewrite, rewrite, tensor_meta

aten = torch.ops.aten

GATES = ("silu", "gelu", "gelu_tanh")
"""The gate activations fused (SwiGLU, GeGLU and its tanh form)."""


def _same_tensors(bound: dict[str, Any], out: fx.Node) -> bool:
    """Whether ``a``, ``b`` and the product are floating tensors of one shape, dtype and device."""
    vals = [tensor_meta(n) for n in (bound["a"], bound["b"], out)]
    if any(v is None for v in vals) or not vals[0].dtype.is_floating_point:
        return False
    return all(v.shape == vals[0].shape and v.dtype == vals[0].dtype and v.device == vals[0].device for v in vals)


def _rewrites(name: str, act: Callable[[Any], Any]) -> list[Rewrite]:
    """``act(a) * b`` and ``b * act(a)`` -> ``dsx.gated_act(a, b, name)``."""

    def gate_first(a: Any, b: Any) -> Any:
        return aten.mul.Tensor(act(a), b)

    def gate_last(a: Any, b: Any) -> Any:
        return aten.mul.Tensor(b, act(a))

    def fused(bound: dict[str, Any]) -> Callable[[Any, Any], Any]:
        return lambda a, b: torch.ops.dsx.gated_act.default(a, b, name)

    return [Rewrite(gate_first, fused, _same_tensors), Rewrite(gate_last, fused, _same_tensors)]


REWRITES = [rw for name in GATES for rw in _rewrites(name, ACTIVATIONS[name])]


def gated_mlp(gm: fx.GraphModule) -> int:
    """Fuse ``act(a) * b`` (act = silu or gelu, a and b of one shape) into ``dsx.gated_act(a, b, act)``."""
    return rewrite(gm, REWRITES)
