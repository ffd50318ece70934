"""Helpers the graph pass tests share: export a module to an ATen graph, list its ops, find fused nodes, compare."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def export(model: nn.Module, *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
    """``model`` (in its current train / eval mode) as the ATen-level GraphModule torch.export gives the passes."""
    return torch.export.export(model, args, kwargs, strict=False).module()


def targets(gm: torch.fx.GraphModule) -> list:
    """The targets of every ``call_function`` node, in graph order."""
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def fused_nodes(gm: torch.fx.GraphModule, op: Any) -> list[torch.fx.Node]:
    """The nodes calling ``op``."""
    return [n for n in gm.graph.nodes if n.target == op]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's max magnitude, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def randomize(module: nn.Module, std: float = 1.0) -> nn.Module:
    """``module`` with every parameter redrawn from N(0, std²) (in place)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)
    return module
