"""Channel dependency graph for structured pruning: which weight dims must shrink together, found by one traced run.

Every activation carries an integer label tensor (one id per channel) that follows each torch op (``trace_ops``);
layers claim the dims of their weights (``layer_rules``), and channels reaching anything not understood stay fixed.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from dsx.compress.grouping import Claim, Group, components, make_groups
from dsx.compress.hf import HeadLayout
from dsx.compress.layer_rules import LayerRule, rule_for
from dsx.compress.trace_ops import OpTracing, along, compact, op_name, varying_dims
from dsx.core.checks import matches
from dsx.core.inputs import Inputs, run_model, tensor_leaves
from dsx.core.transform import eval_mode

__all__ = ["Claim", "DepGraph", "Group", "LOOSE_LIMIT", "build_depgraph", "matches", "tensor_leaves"]

LOOSE_LIMIT = 1 << 16
"""Parameters used directly in ops (not through a known layer) are followed per element up to this size."""


@dataclass
class DepGraph:
    """The result of ``build_depgraph``: claims (ids mapped to classes), the groups, the modules traced as units
    (attention, fused MLPs, MoE experts: patched after shrinking) with their layouts, the model's output shapes and
    the layers without a rule that alone keep some group (name -> class name)."""

    claims: list[Claim]
    groups: list[Group]
    num_classes: int
    layouts: dict[str, HeadLayout] = field(default_factory=dict)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    unruled: dict[str, str] = field(default_factory=dict)


class Tracer(OpTracing, TorchFunctionMode):
    """Runs the model once, following channel ids through ops (a TorchFunctionMode) and known layers (hooks).

    ``rules``: the rule of each module traced as a unit (by id); ``inside``: the layers with parameters but no rule
    whose forward is running, innermost last, so that what they pin can name them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names: dict[int, str] = {}
        self.kinds: dict[str, str] = {}
        for name, p in model.named_parameters():
            self.names[id(p)], self.kinds[name] = name, "param"
        for name, b in model.named_buffers():
            self.names[id(b)], self.kinds[name] = name, "buffer"
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self.labels: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self.count = 0
        self.pairs: list[np.ndarray] = []
        self.pins: list[tuple[np.ndarray, str, str | None]] = []
        self.claims: dict[tuple[str, int | None], Claim] = {}
        self.by_tensor: dict[str, list[Claim]] = defaultdict(list)
        self.sources: dict[str, np.ndarray] = {}
        self.layouts: dict[str, HeadLayout] = {}
        self.depth = 0
        self.rules: dict[int, LayerRule] = {}
        self.inside: list[str] = []
        self.unruled: dict[str, str] = {}

    # ids and labels -------------------------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        self.count += n
        return np.arange(self.count - n, self.count, dtype=np.int64)

    def source(self, key: str, n: int) -> np.ndarray:
        """Fresh ids for the ``n`` output channels of ``key``, the same on every call of that layer."""
        if key not in self.sources:
            self.sources[key] = self.fresh(n)
        return self.sources[key]

    def union(self, a: Any, b: Any) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        both = (a >= 0) & (b >= 0) & (a != b)
        if both.any():
            self.pairs.append(np.unique(np.stack([a[both], b[both]], 1), axis=0))

    def pin(self, ids: Any, reason: str) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = np.unique(ids[ids >= 0])
        if len(ids):
            self.pins.append((ids, reason, self.inside[-1] if self.inside else None))

    def get(self, t: torch.Tensor) -> torch.Tensor | None:
        name = self.names.get(id(t))
        if name is not None:
            return self.param_label(name, t)
        entry = self.labels.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def set(self, t: torch.Tensor, label: torch.Tensor | None) -> None:
        key = id(t)
        if key in self.names:
            return
        if label is None or not bool((label >= 0).any()):
            self.labels.pop(key, None)
            return

        def drop(ref: weakref.ref, key: int = key) -> None:
            if self.labels.get(key, (None,))[0] is ref:
                del self.labels[key]

        self.labels[key] = (weakref.ref(t, drop), compact(label, t.shape))

    def param_label(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """A parameter used directly in an op: its layer claims if any, else (a loose parameter) one id per element."""
        claims = self.by_tensor.get(name)
        if claims:
            labelled = [c for c in claims if (c.ids >= 0).any()]
            if not labelled:
                return None
            if len(labelled) == 1 and labelled[0].dim is not None:
                return along(labelled[0].ids, t.dim(), labelled[0].dim)
            if len(labelled) == 1:
                return torch.as_tensor(labelled[0].ids).reshape(t.shape)
            for c in labelled:
                self.pin(c.ids, f"{name} is used outside its layer")
            return None
        if self.kinds[name] != "param" or not t.is_floating_point() or t.numel() > LOOSE_LIMIT:
            return None
        ids = self.fresh(t.numel())
        owner = name.rpartition(".")[0]
        self.add_claim(Claim(name, None, ids, owner, {owner}, "loose"))
        return torch.as_tensor(ids).reshape(t.shape)

    def channel_ids(self, x: torch.Tensor, dim: int, owner: str) -> np.ndarray:
        """The id of each channel of ``x`` along ``dim`` (-1: fixed); pins ids that also vary along other dims."""
        n = x.shape[dim]
        label = self.get(x)
        if label is None:
            return np.full(n, -1, dtype=np.int64)
        dim %= x.dim()
        others = [d for d in varying_dims(label) if d != dim]
        if others:
            self.pin(label, f"{owner}: its input's channels also vary along dim(s) {others}")
            return np.full(n, -1, dtype=np.int64)
        flat = label.reshape(-1).numpy()
        return flat.copy() if len(flat) == n else np.full(n, flat[0], dtype=np.int64)

    # claims ---------------------------------------------------------------------------------------------------
    def claim(self, module: nn.Module, tensor: str, dim: int | None, ids: np.ndarray, owner: str, *,
              role: str | None = None, source: bool = False, blocks: int = 1, grouped: int = 1) -> None:
        if not isinstance(t := getattr(module, tensor, None), torch.Tensor):
            return
        if id(t) not in self.names:
            self.pin(ids, f"{self.module_names[id(module)]}.{tensor} is not a plain parameter (parametrized?)")
            return
        role = role or ("stat" if self.kinds[self.names[id(t)]] == "buffer" else tensor)
        self.add_claim(Claim(self.names[id(t)], dim, np.asarray(ids, dtype=np.int64).copy(), owner,
                             {self.module_names[id(module)]}, role, source, blocks, grouped))

    def add_claim(self, new: Claim) -> None:
        key = (new.tensor, new.dim)
        existing = self.by_tensor.get(new.tensor, [])
        if any((c.dim is None) != (new.dim is None) for c in existing):
            for c in [*existing, new]:
                self.pin(c.ids, f"{new.tensor} is used both by its layer and directly in ops")
        old = self.claims.get(key)
        if old is None:
            self.claims[key] = new
            self.by_tensor[new.tensor].append(new)
            return
        old.modules |= new.modules
        if len(old.ids) != len(new.ids) or (old.grouped, old.blocks) != (new.grouped, new.blocks):
            self.pin(np.concatenate([old.ids, new.ids]), f"{new.tensor} is shared by layers that use it differently")
            return
        self.union(np.where(new.ids >= 0, old.ids, -1), new.ids)
        one_fixed = (old.ids >= 0) != (new.ids >= 0)
        self.pin(np.concatenate([old.ids[one_fixed], new.ids[one_fixed]]),
                 f"{new.tensor} is shared with a layer that keeps its size")

    # layers ---------------------------------------------------------------------------------------------------
    def unit(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        name = self.module_names[id(module)]
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input", next(iter(kwargs.values()), None)))
        outs = tensor_leaves(out)
        if not isinstance(x, torch.Tensor):  # its weights stay unclaimed, its outputs fixed
            return self.label_outputs(outs, np.zeros(0, dtype=np.int64), 0)
        self.rules[id(module)].trace(self, module, name, (x, *args[1:]), kwargs, outs)

    def label_outputs(self, outs: list[torch.Tensor], ids: np.ndarray, dim: int) -> None:
        """The first output carries ``ids`` along ``dim``; any other output is fixed."""
        for i, o in enumerate(outs):
            self.set(o, along(ids, o.dim(), dim % o.dim()) if i == 0 and o.dim() and o.shape[dim] == len(ids)
                     else None)

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.depth += 1

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.depth += 1
            try:
                self.unit(module, args, kwargs, out)
            finally:
                self.depth -= 1

    def enter_unruled(self, module: nn.Module, args: tuple) -> None:
        """A layer with parameters but no rule starts: what its ops pin is put down to it."""
        self.inside.append(self.module_names[id(module)])

    def leave_unruled(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.inside.pop()

    # ops ------------------------------------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        self.depth += 1  # the tracer's own tensor ops run untraced
        try:
            return self.after(op_name(func), func, args, kwargs, out)
        finally:
            self.depth -= 1

    # result ---------------------------------------------------------------------------------------------------
    def build(self, skip: Sequence[str], out: Any) -> DepGraph:
        leaves = tensor_leaves(out)
        for t in leaves:
            label = self.get(t)
            if label is not None:
                self.pin(label, "it reaches the model output")
        for c in self.claims.values():
            hit = next((p for p in skip for m in c.modules if matches(m, p)), None)
            if hit is not None:
                self.pin(c.ids, f"skipped (skip={hit!r})")
        pairs = np.concatenate(self.pairs) if self.pairs else np.zeros((0, 2), dtype=np.int64)
        _, cls = np.unique(components(self.count, pairs), return_inverse=True)
        claims = list(self.claims.values())
        for c in claims:
            c.ids = np.where(c.ids >= 0, cls[np.maximum(c.ids, 0)], -1)
        pinned: dict[int, str] = {}
        by: dict[int, set[str | None]] = defaultdict(set)
        for ids, reason, layer in self.pins:
            for k in np.unique(cls[ids]).tolist():
                pinned.setdefault(k, reason)
                by[k].add(layer)
        groups = make_groups(claims, pinned)
        unruled = {}
        for g in groups:
            layers = set().union(*(by[k] for k in g.classes.tolist() if k in by))
            if layers and None not in layers and not any(matches(n, p) for n in layers for p in skip):
                unruled.update((n, self.unruled[n]) for n in sorted(layers))
                g.reason += f" (in {', '.join(sorted(layers))}, which dsx has no rule for: see " \
                    "dsx.compress.register_layer)"
        return DepGraph(claims, groups, int(cls.max()) + 1 if len(cls) else 0, self.layouts,
                        [tuple(t.shape) for t in leaves], unruled)


def build_depgraph(model: nn.Module, inputs: Inputs, *, skip: Sequence[str] = ()) -> DepGraph:
    """Trace ``model`` (in eval mode, no grad) on ``inputs`` and return its channel groups.

    Groups whose channels reach the model output, an op dsx does not follow, a fixed-size reshape or a ``skip``ped
    module (a name or ``"re:<regex>"``; a name covers its children) carry a ``reason`` and must not be pruned.
    Layers are traced as units through their rules (``layer_rules``); a layer holding parameters without one is
    traced op by op, and a warning names it when it alone keeps some channels.

    Args:
        model: the model.
        inputs: example inputs to trace it on.
        skip: module names or ``"re:<regex>"`` patterns whose channels stay.

    Returns:
        The dependency graph.

    Raises:
        TypeError: ``skip`` is a single string.
    """
    if isinstance(skip, str):
        raise TypeError("skip: expected a list of names or 're:' patterns, got a single string; wrap it in a list")
    names = [n for n, _ in model.named_modules()]
    for p in skip:
        if not any(matches(n, p) for n in names):
            warnings.warn(f"structured pruning: skip pattern {p!r} matches no module", stacklevel=3)
    tracer = Tracer(model)
    handles = []
    for m in model.modules():
        if (rule := rule_for(m)) is not None:
            tracer.rules[id(m)] = rule
            handles.append(m.register_forward_pre_hook(tracer.enter, with_kwargs=True))
            handles.append(m.register_forward_hook(tracer.leave, with_kwargs=True))
        elif next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None:
            tracer.unruled[tracer.module_names[id(m)]] = type(m).__name__
            handles.append(m.register_forward_pre_hook(tracer.enter_unruled))
            handles.append(m.register_forward_hook(tracer.leave_unruled))
    try:
        with eval_mode(model), tracer:
            out = run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    graph = tracer.build(skip, out)
    if graph.unruled:
        layers = ", ".join(f"{n} ({c})" for n, c in graph.unruled.items())
        warnings.warn(f"structured pruning leaves the channels around {layers} unpruned: dsx has no rule for that "
                      "layer type, which holds parameters; teach dsx how to prune it with "
                      "dsx.compress.register_layer(cls, rule)", stacklevel=3)
    return graph

