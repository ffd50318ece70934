"""Graph pass folding eval-mode BatchNorm into the convolution or linear layer that feeds it.

Normalization becomes a per-channel scale and shift of the layer's weight and bias, so activations are read once.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from dsx.graph.fx_utils import add_constant, arg, get_constant, is_call, only_user, tensor_meta

aten = torch.ops.aten

_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)

# batch-norm op -> (position of its `training` flag or None, position of eps, whether it returns a tuple)
_BATCH_NORMS = {
    aten.batch_norm.default: (5, 7, False),
    aten.native_batch_norm.default: (5, 7, True),
    aten._native_batch_norm_legit_no_training.default: (None, 6, True),
}


def _layer(bn: fx.Node) -> fx.Node | None:
    """The conv / linear node feeding ``bn`` when the BatchNorm is its only user and normalizes its channels."""
    src = bn.args[0]
    if not isinstance(src, fx.Node) or only_user(src) is not bn:
        return None
    out, w = tensor_meta(src), tensor_meta(arg(src, 1, "weight"))
    if out is None or w is None or out.dtype != w.dtype:
        return None
    if is_call(src, *_CONVS) or (is_call(src, aten.convolution.default) and arg(src, 6, "transposed") is False):
        return src if out.dim() == w.dim() else None
    if is_call(src, aten.linear.default):
        return src if out.dim() == 2 else None
    return None


def _outputs(bn: fx.Node, returns_tuple: bool) -> list[fx.Node] | None:
    """The nodes carrying the normalized tensor: ``bn`` itself, or its getitem(0) when the statistics are unread."""
    if not returns_tuple:
        return [bn]
    users = list(bn.users)
    if not all(is_call(u, operator.getitem) and (u.args[1] == 0 or not u.users) for u in users):
        return None
    return [u for u in users if u.args[1] == 0]


def _set(node: fx.Node, index: int, name: str, value: Any) -> None:
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _emit(graph: fx.Graph, op: Any, *args: Any) -> fx.Node:
    node = graph.call_function(op, args)
    node.meta["val"] = op(*(a.meta["val"] if isinstance(a, fx.Node) else a for a in args))
    return node


def _constant(gm: fx.GraphModule, like: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    """A new parameter holding ``value``, read by a get_attr placed before ``like`` (whose example value
    supplies the fake mode for the new node's ``meta['val']``)."""
    node = add_constant(gm, like, name, value)
    mode = getattr(tensor_meta(like), "fake_mode", None)
    node.meta["val"] = mode.from_tensor(value) if mode is not None else value
    return node


def _fold_constants(gm: fx.GraphModule, layer: fx.Node, w: fx.Node, b: fx.Node | None, gamma: fx.Node | None,
                    beta: fx.Node | None, mean: fx.Node, var: fx.Node, eps: float) -> None:
    """Compute the folded weight and bias once in float64 and store them as new parameters of ``gm``."""
    def value(node: fx.Node | None, default: float = 0.0) -> torch.Tensor | float:
        return default if node is None else get_constant(gm, node).detach().double()

    weight = get_constant(gm, w)
    bias_dtype = weight.dtype if b is None else get_constant(gm, b).dtype
    with torch.no_grad():
        scale = value(gamma, 1.0) * torch.rsqrt(value(var) + eps)
        new_w = (weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
        new_b = ((value(b) - value(mean)) * scale + value(beta)).to(bias_dtype)
    name = w.target.replace(".", "_")
    _set(layer, 1, "weight", _constant(gm, layer, f"{name}_bn_folded", new_w.requires_grad_(weight.requires_grad)))
    _set(layer, 2, "bias", _constant(gm, layer, f"{name}_bn_folded_bias", new_b.requires_grad_(weight.requires_grad)))


def _fold_ops(gm: fx.GraphModule, layer: fx.Node, w: fx.Node, b: fx.Node | None, gamma: fx.Node | None,
              beta: fx.Node | None, mean: fx.Node, var: fx.Node, eps: float) -> None:
    """Emit the folding as graph ops on the weights (the parameters are graph inputs, e.g. under torch.compile)."""
    g = gm.graph
    with g.inserting_before(layer):
        scale = _emit(g, aten.rsqrt.default, _emit(g, aten.add.Tensor, var, eps))
        if gamma is not None:
            scale = _emit(g, aten.mul.Tensor, scale, gamma)
        shape = [-1] + [1] * (tensor_meta(w).dim() - 1)
        new_w = _emit(g, aten.mul.Tensor, w, _emit(g, aten.reshape.default, scale, shape))
        shift = _emit(g, aten.neg.default, mean) if b is None else _emit(g, aten.sub.Tensor, b, mean)
        new_b = _emit(g, aten.mul.Tensor, shift, scale)
        if beta is not None:
            new_b = _emit(g, aten.add.Tensor, new_b, beta)
    _set(layer, 1, "weight", new_w)
    _set(layer, 2, "bias", new_b)


def fold_batch_norm(gm: fx.GraphModule) -> int:
    """Fold eval-mode BatchNorm into the preceding conv / linear (constant weights, or graph ops on weight inputs)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for bn in list(gm.graph.nodes):
        if not is_call(bn, *_BATCH_NORMS):
            continue
        train_at, eps_at, returns_tuple = _BATCH_NORMS[bn.target]
        layer, outs = _layer(bn), _outputs(bn, returns_tuple)
        if (train_at is not None and arg(bn, train_at, "training") is not False) or layer is None or outs is None:
            continue
        w, b = layer.args[1], arg(layer, 2, "bias")
        gamma, beta, mean, var = (arg(bn, i, name) for i, name in
                                  enumerate(("weight", "bias", "running_mean", "running_var"), start=1))
        params = [n for n in (w, b, gamma, beta, mean, var) if n is not None]
        vals = [tensor_meta(n) for n in params]
        channels = vals[0].shape[0]
        if mean is None or var is None or any(v is None or v.shape != (channels,) for v in vals[1:]):
            continue
        if all(get_constant(gm, n) is not None for n in params):
            _fold_constants(gm, layer, w, b, gamma, beta, mean, var, float(arg(bn, eps_at, "eps")))
        elif all(v.dtype == vals[0].dtype for v in vals) and all(order[n] < order[layer] for n in params):
            _fold_ops(gm, layer, w, b, gamma, beta, mean, var, float(arg(bn, eps_at, "eps")))
        else:
            continue
        for out in outs:
            out.replace_all_uses_with(layer)
        for user in list(bn.users):
            gm.graph.erase_node(user)
        gm.graph.erase_node(bn)
        count += 1
    return count
