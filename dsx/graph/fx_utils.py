"""Helpers shared by the fx graph passes: op matching, constants, node erasure, residual-norm fusion and the
pattern / replacement rewriter, so each pass holds only its own pattern.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.utils.matcher_utils import InternalMatch
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

aten = torch.ops.aten
ASSERT = aten._assert_tensor_metadata.default


def is_call(node: Any, *targets: Any) -> bool:
    """True if ``node`` is a ``call_function`` node whose target is one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def only_user(node: fx.Node) -> fx.Node | None:
    """The single user of ``node``, or None when it has zero or several users."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def get_constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None if ``node`` is not a constant."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj: Any = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def add_constant(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    """Register ``value`` as a parameter of ``gm`` under a fresh name and return a get_attr node for it."""
    base = name.replace(".", "_")
    target, i = base, 0
    while hasattr(gm, target):
        i += 1
        target = f"{base}_{i}"
    gm.register_parameter(target, torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(target)


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The example value recorded on a node by export / fake propagation (``meta['val']``)."""
    if isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def other_operand(node: fx.Node, known: Any) -> Any:
    """The operand of the binary op ``node`` that is not ``known``."""
    a, b = node.args[:2]
    return b if a is known else a


def is_row_vector(node: Any, n: int) -> bool:
    """True for None or a node holding a 1-D tensor of length ``n`` (a norm weight or a bias)."""
    val = tensor_meta(node)
    return node is None or (val is not None and tuple(val.shape) == (n,))


ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "gelu": aten.gelu.default,
    "gelu_tanh": lambda y: aten.gelu.default(y, approximate="tanh"),
    "silu": aten.silu.default,
    "relu": aten.relu.default,
}
"""The activations dsx's fused ops compute, by their dsx name, as the ATen call a pattern writes for each."""


def erase_dead(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the given call nodes (in reverse order) that nothing but metadata asserts reads any more."""
    for node in reversed(list(nodes)):
        users = list(node.users)
        if node.op == "call_function" and all(is_call(u, ASSERT) for u in users):
            for user in users:
                gm.graph.erase_node(user)
            gm.graph.erase_node(node)


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


def defined_before(order: dict[fx.Node, int], nodes: Sequence[Any], anchor: fx.Node) -> bool:
    """Whether every node in ``nodes`` (None allowed) comes before ``anchor`` in the graph order ``order``."""
    return all(n is None or order.get(n, len(order)) < order[anchor] for n in nodes)


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
    erase_dead(gm, [add, *pattern])


@dataclass(frozen=True)
class Rewrite:
    """A pattern / replacement pair over ATen ops, in the style of inductor's pattern passes.

    ``pattern`` is a function of placeholders written with ``torch.ops.aten`` calls; a placeholder matches a node or
    a literal (a scale, a dim). ``check(bound, out)`` sees the bound placeholders by name and the matched output
    node and decides whether to rewrite; ``replacement(bound)`` returns the function (same parameters as
    ``pattern``) whose trace replaces the match. Internal pattern nodes must have no users outside the match.
    """

    pattern: Callable[..., Any]
    replacement: Callable[[dict[str, Any]], Callable[..., Any]]
    check: Callable[[dict[str, Any], fx.Node], bool]

    @functools.cached_property
    def pattern_graph(self) -> fx.Graph:
        """``pattern`` traced once: the rewriter only reads it, and a pass runs on every compiled graph."""
        return fx.symbolic_trace(self.pattern).graph


def _bound(match: InternalMatch) -> dict[str, Any]:
    return {pn.target: gn for pn, gn in match.nodes_map.items() if pn.op == "placeholder"}


def _infer_meta(nodes: Iterable[fx.Node]) -> None:
    """Record ``meta['val']`` on new call nodes by running them on their inputs' (fake) example values."""
    for node in nodes:
        if node.op != "call_function" or "val" in node.meta:
            continue
        if any("val" not in n.meta for n in node.all_input_nodes):
            continue
        args, kwargs = pytree.tree_map_only(fx.Node, lambda n: n.meta["val"], (node.args, node.kwargs))
        fakes = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, FakeTensor)]
        with fakes[0].fake_mode if fakes else contextlib.nullcontext():
            node.meta["val"] = node.target(*args, **kwargs)


def rewrite(gm: fx.GraphModule, rewrites: Sequence[Rewrite]) -> int:
    """Apply each pattern / replacement pair of ``rewrites`` in order to ``gm`` (in place); return the count."""
    count = 0
    for rw in rewrites:

        def check(match: InternalMatch, original: fx.Graph, pattern: fx.Graph, rw: Rewrite = rw) -> bool:
            return bool(rw.check(_bound(match), match.returning_nodes[0]))

        def build(match: InternalMatch, original: fx.Graph, pattern: fx.Graph, rw: Rewrite = rw) -> fx.Graph:
            return fx.symbolic_trace(rw.replacement(_bound(match))).graph

        replaced = replace_pattern_with_filters(gm, rw.pattern_graph, match_filters=[check], replacement_callback=build)
        for r in replaced:
            _infer_meta(r.replacements)
        count += len(replaced)
    return count


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Clean up and recompile after a rewrite."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def drop_unused_state(gm: fx.GraphModule) -> list[str]:
    """Delete parameters/buffers of ``gm`` that no ``get_attr`` node reads any more; return their names."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    owners = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    dropped = []
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name in used or any(name.startswith(o + ".") for o in owners):
            continue
        parent, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
        else:
            continue
        dropped.append(name)
    return dropped
