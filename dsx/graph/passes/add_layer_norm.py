"""Graph pass fusing a residual ``add`` that feeds a last-dim LayerNorm into one ``dsx::add_layer_norm`` node.

The fused node returns (normed, sum): [0] replaces the norm, [1] replaces the add for the residual stream.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import dsx.kernels.add_layer_norm  # noqa: F401  (registers torch.ops.dsx.add_layer_norm)
from dsx.graph.fx_utils import (
    arg, defined_before, fuse_residual, is_call, is_row_vector, residual_operands, tensor_meta,
)

aten = torch.ops.aten


def _layer_norm(node: fx.Node) -> tuple[fx.Node, list[fx.Node], tuple] | None:
    """For a LayerNorm node: (output node, pattern nodes, (input, normalized_shape, weight, bias, eps))."""
    params = (arg(node, 0, "input"), arg(node, 1, "normalized_shape"), arg(node, 2, "weight"),
              arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5))
    if is_call(node, aten.layer_norm.default):
        return node, [node], params
    getitems = list(node.users)
    if not all(is_call(g, operator.getitem) for g in getitems):
        return None
    outs = [g for g in getitems if g.args[1] == 0]
    if len(outs) != 1 or any(g.users for g in getitems if g.args[1] != 0):
        return None
    return outs[0], [node, *getitems], params


def add_layer_norm(gm: fx.GraphModule) -> int:
    """Fuse ``add(a, b)`` feeding ``layer_norm`` over the last dim into ``dsx.add_layer_norm``."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for node in list(order):
        if not is_call(node, aten.layer_norm.default, aten.native_layer_norm.default):
            continue
        match = _layer_norm(node)
        if match is None:
            continue
        out, pattern, (add, shape, weight, bias, eps) = match
        operands, val, out_val = residual_operands(add), tensor_meta(add), tensor_meta(out)
        if operands is None or out_val is None or out_val.dtype != val.dtype:
            continue
        n = val.shape[-1]
        if list(shape) != [n] or not (is_row_vector(weight, n) and is_row_vector(bias, n)):
            continue
        if not defined_before(order, (weight, bias), add):
            continue
        args = (*operands, weight, bias, float(eps))
        fuse_residual(gm, add, out, torch.ops.dsx.add_layer_norm.default, args, pattern)
        count += 1
    return count
