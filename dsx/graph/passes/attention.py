"""Graph pass rewriting hand-written attention (matmul, scale, mask, softmax, matmul) into one SDPA call.

``scaled_dot_product_attention`` dispatches to fused flash / memory-efficient kernels that never store the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from dsx.graph.fx_utils import arg, is_call, tensor_meta

aten = torch.ops.aten

_ASSERT = aten._assert_tensor_metadata.default
_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class _Scores:
    """``matmul(q, kT)`` and what lies between it and the softmax: a positive scale and a mask."""

    qk: fx.Node
    scale: float = 1.0
    mask: fx.Node | None = None
    invert_mask: bool = False
    nodes: list[fx.Node] = field(default_factory=list)


def _user(node: fx.Node) -> fx.Node | None:
    """The single user of ``node``, not counting metadata assertions (which the rewrite drops)."""
    users = [u for u in node.users if not is_call(u, _ASSERT)]
    return users[0] if len(users) == 1 else None


def _feeds(node: object, user: fx.Node) -> bool:
    return isinstance(node, fx.Node) and _user(node) is user


def _positive(c: object) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0


def _probabilities(softmax: fx.Node, dtype: torch.dtype) -> tuple[list[fx.Node], fx.Node] | None:
    """The softmax, an optional cast, and the ``matmul(p, v)`` they feed; the probabilities must reach the
    matmul in ``dtype`` (a float32 softmax of a half-precision input is allowed when it is cast back)."""
    chain, node = [softmax], _user(softmax)
    if is_call(node, *_CASTS) and getattr(tensor_meta(node), "device", None) == tensor_meta(softmax).device:
        chain.append(node)
        node = _user(node)
    if not (is_call(node, aten.matmul.default) and node.args[0] is chain[-1]):
        return None
    computed = tensor_meta(softmax).dtype
    upcast = computed == torch.float32 and dtype in _LOW_PRECISION
    if tensor_meta(chain[-1]).dtype != dtype or (computed != dtype and not upcast):
        return None
    return chain, node


def _is_scores(node: object, user: fx.Node) -> bool:
    return is_call(node, aten.mul.Tensor, aten.div.Tensor, aten.matmul.default) and _feeds(node, user)


def _scores(node: fx.Node) -> _Scores | None:
    """Walk back from the softmax input through an optional mask, then an optional scale, to ``matmul(q, kT)``."""
    nodes: list[fx.Node] = []
    mask, invert = None, False
    additive = is_call(node, aten.add.Tensor) and arg(node, 2, "alpha", 1) == 1
    if additive or (is_call(node, aten.masked_fill.Scalar, aten.where.ScalarOther) and node.args[2] == -math.inf):
        invert = node.target == aten.masked_fill.Scalar
        first_is_score = invert or (additive and _is_scores(node.args[0], node))
        score, mask = node.args[:2] if first_is_score else node.args[1::-1]
        sval, mval = tensor_meta(score), tensor_meta(mask)
        if not (_is_scores(score, node) and sval is not None and mval is not None) \
                or mval.dtype != (sval.dtype if additive else torch.bool) or tensor_meta(node).shape != sval.shape:
            return None
        nodes, node = [node], score
    scale = 1.0
    if is_call(node, aten.mul.Tensor, aten.div.Tensor):
        x, c = node.args[:2]
        if node.target == aten.mul.Tensor and not isinstance(x, fx.Node):
            x, c = c, x
        if not (is_call(x, aten.matmul.default) and _feeds(x, node) and _positive(c)):
            return None
        scale = float(c) if node.target == aten.mul.Tensor else 1.0 / c
        nodes, node = [node, *nodes], x
    if not is_call(node, aten.matmul.default):
        return None
    return _Scores(node, scale, mask, invert, [node, *nodes])


@dataclass
class _Match:
    q: fx.Node
    kt: fx.Node
    v: fx.Node
    out: fx.Node
    scores: _Scores
    chain: list[fx.Node]


def _match(softmax: fx.Node) -> _Match | None:
    s = softmax.args[0]
    sval = tensor_meta(s)
    if not _feeds(s, softmax) or sval is None or tensor_meta(softmax) is None \
            or softmax.args[1] not in (-1, sval.dim() - 1):
        return None
    probs, scores = _probabilities(softmax, sval.dtype), _scores(s)
    if probs is None or scores is None:
        return None
    out = probs[1]
    q, kt, v = (*scores.qk.args[:2], out.args[1])
    vals = [tensor_meta(n) for n in (q, kt, v, out)]
    if any(t is None for t in vals) or len({(t.dim(), t.dtype, t.device) for t in vals}) != 1:
        return None
    qv, ktv, vv, _ = vals
    chain = scores.nodes + probs[0] + [out]
    if any(n in chain for n in (q, kt, v, scores.mask)) or qv.dim() < 3 or not qv.dtype.is_floating_point or not (
            qv.shape[:-2] == ktv.shape[:-2] == vv.shape[:-2] and qv.shape[-1] == ktv.shape[-2]
            and ktv.shape[-1] == vv.shape[-2]):
        return None
    return _Match(q, kt, v, out, scores, chain)


def _key(graph: fx.Graph, kt: fx.Node) -> fx.Node:
    """``k`` from ``kT``: the input of a transpose / permute swapping the last two dims, else a new transpose."""
    n = tensor_meta(kt).dim()
    if is_call(kt, aten.transpose.int) and {d % n for d in kt.args[1:3]} == {n - 2, n - 1}:
        return kt.args[0]
    if is_call(kt, aten.permute.default) and [d % n for d in kt.args[1]] == [*range(n - 2), n - 1, n - 2]:
        return kt.args[0]
    k = graph.call_function(aten.transpose.int, (kt, -2, -1))
    k.meta["val"] = tensor_meta(kt).transpose(-2, -1)
    return k


def _rewrite(gm: fx.GraphModule, m: _Match) -> None:
    g, scores = gm.graph, m.scores
    with g.inserting_before(m.out):
        mask = scores.mask
        if scores.invert_mask:
            mask = g.call_function(aten.logical_not.default, (scores.mask,))
            mask.meta["val"] = tensor_meta(scores.mask).logical_not()
        sdpa = g.call_function(aten.scaled_dot_product_attention.default, (m.q, _key(g, m.kt), m.v),
                               {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": scores.scale})
    sdpa.meta.update(m.out.meta)
    m.out.replace_all_uses_with(sdpa)
    for node in reversed(m.chain):
        for user in [u for u in node.users if is_call(u, _ASSERT)]:
            g.erase_node(user)
        g.erase_node(node)


def attention_to_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite matmul(q, kT) [* scale] [+ mask] -> softmax -> matmul(p, v) into scaled_dot_product_attention."""
    count = 0
    for node in list(gm.graph.nodes):
        if is_call(node, aten.softmax.int):
            m = _match(node)
            if m is not None:
                _rewrite(gm, m)
                count += 1
    return count
