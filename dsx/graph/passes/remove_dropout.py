"""Graph pass removing dropout that is a no-op (eval mode or p == 0) and ``aten.alias`` identity ops.

They copy or pass activations through unchanged, and leaving them in the way hides patterns from later passes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from dsx.graph.fx_utils import arg, is_call

aten = torch.ops.aten

_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default)


def _is_noop(node: fx.Node) -> bool:
    return arg(node, 2, "train") is False or arg(node, 1, "p") == 0


def _remove_native_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``native_dropout`` returns (out, mask): removable when no-op and only ``out`` is read."""
    getitems = list(node.users)
    if not all(is_call(g, operator.getitem) and (g.args[1] == 0 or not g.users) for g in getitems):
        return False
    for g in getitems:
        g.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(g)
    gm.graph.erase_node(node)
    return True


def remove_dropout(gm: fx.GraphModule) -> int:
    """Remove eval-mode / p=0 dropout and aten.alias nodes, rewiring their users to the input."""
    count = 0
    for node in list(gm.graph.nodes):
        if is_call(node, aten.native_dropout.default):
            if _is_noop(node) and _remove_native_dropout(gm, node):
                count += 1
        elif is_call(node, aten.alias.default) or (is_call(node, *_DROPOUTS) and _is_noop(node)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    return count
