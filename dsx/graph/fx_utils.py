"""Small helpers shared by the fx graph passes: op matching, constants, node replacement."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten


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


def erase_dead(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes (in reverse order) when nothing uses them any more."""
    for node in reversed(list(nodes)):
        if not node.users and node.op == "call_function":
            gm.graph.erase_node(node)


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
