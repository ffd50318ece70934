"""Graph pass fusing a residual ``add`` that feeds a last-dim LayerNorm into one ``dsx::add_layer_norm`` node.

The fused node returns (normed, sum): [0] replaces the norm, [1] replaces the add for the residual stream.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

import dsx.kernels.add_layer_norm  # noqa: F401  (registers torch.ops.dsx.add_layer_norm)
from dsx.graph.fx_utils import arg, is_call, tensor_meta
from dsx.graph.pass_manager import register

aten = torch.ops.aten
ASSERT = aten._assert_tensor_metadata.default


def residual_operands(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """``(a, b)`` when ``node`` is ``aten.add.Tensor(a, b)`` of two tensors of equal shape and dtype, alpha 1."""
    if not is_call(node, aten.add.Tensor) or arg(node, 2, "alpha", 1) != 1:
        return None
    a, b = node.args[:2]
    va, vb, vo = tensor_meta(a), tensor_meta(b), tensor_meta(node)
    if va is None or vb is None or vo is None:
        return None
    if va.shape != vb.shape or not va.dtype == vb.dtype == vo.dtype or va.device != vb.device:
        return None
    return a, b


def is_row_vector(node: Any, n: int) -> bool:
    """True for None or a node holding a 1-D tensor of length ``n`` (a norm weight or bias)."""
    val = tensor_meta(node)
    return node is None or (val is not None and tuple(val.shape) == (n,))


def defined_before(order: dict[fx.Node, int], nodes: Sequence[Any], anchor: fx.Node) -> bool:
    """Whether every node in ``nodes`` (None allowed) comes before ``anchor`` in the graph order ``order``."""
    return all(n is None or order.get(n, len(order)) < order[anchor] for n in nodes)


def drop(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> None:
    """Erase pattern ``nodes`` (in reverse) whose only remaining users are metadata asserts."""
    for node in reversed(nodes):
        users = list(node.users)
        if all(is_call(u, ASSERT) for u in users):
            for u in users:
                gm.graph.erase_node(u)
            gm.graph.erase_node(node)


def fuse_residual(
    gm: fx.GraphModule, add: fx.Node, out: fx.Node, op: Any, args: tuple, pattern: Sequence[fx.Node]
) -> None:
    """Insert ``op(*args) -> (normed, sum)`` right after ``add``; rewire ``out`` and ``add`` users; erase the rest."""
    graph = gm.graph
    with graph.inserting_before(add.next):
        fused = graph.call_function(op, args)
        normed = graph.call_function(operator.getitem, (fused, 0))
        total = graph.call_function(operator.getitem, (fused, 1))
    normed.meta["val"], total.meta["val"] = out.meta["val"], add.meta["val"]
    fused.meta["val"] = (out.meta["val"], add.meta["val"])
    out.replace_all_uses_with(normed)
    add.replace_all_uses_with(total)
    drop(gm, [add, *pattern])


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


@register("add_layer_norm", kernel=True)
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
