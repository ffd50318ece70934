"""Per-layer rules for structured pruning: which weight dims of a layer hold its channels, and how it resizes.

One registry holds the built-in layers and the ones users teach dsx with ``register_layer``, so a custom layer with
its own parameters can be pruned instead of pinned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn as nn

from dsx.compress.hf import HeadLayout, unit_input
from dsx.compress.hf_layouts import unit_layout
from dsx.compress.trace_ops import along
from dsx.core.modules import is_hf_conv1d

if TYPE_CHECKING:
    from dsx.compress.depgraph import Tracer


class LayerRule:
    """How one layer type takes part in structured pruning; register an instance with ``register_layer``.

    Override ``in_channels`` and ``out_channels`` (parameter name -> the dim holding the layer's input / output
    channels) and ``resize`` (set the size attributes forward reads once the tensors shrank). The layer's forward is
    not traced: the rule speaks for everything inside it.

    Attributes:
        channel_dim: the dim of the layer's input and output activations holding the channels (-1: last, as in a
            linear layer; 1 for [batch, channels, ...] as in a conv).
        keeps_channels: the output carries the input's channels (a norm, a per-channel scale): ``in_channels`` dims
            follow them and ``out_channels`` is not used.
        roles: parameter name -> role for the importance scores ({"weight": "bn_weight"} feeds ``"bn_scale"``).
    """

    channel_dim: int = -1
    keeps_channels: bool = False
    roles: dict[str, str] = {}

    def accepts(self, layer: nn.Module) -> bool:
        """Whether this rule can prune ``layer`` (one of its type); a layer it refuses is not traced as a unit.

        Args:
            layer: a module of the registered type.

        Returns:
            True unless overridden.
        """
        return True

    def in_channels(self, layer: nn.Module) -> dict[str, int]:
        """The parameters (or buffers) with a dim sized by the layer's input channels.

        Args:
            layer: the layer.

        Returns:
            Tensor attribute name -> dim; empty when none (the input channels then stay).
        """
        return {}

    def out_channels(self, layer: nn.Module) -> dict[str, int]:
        """The parameters (or buffers) with a dim sized by the layer's output channels, the first one first.

        Args:
            layer: the layer.

        Returns:
            Tensor attribute name -> dim; empty when the output channels stay.
        """
        return {}

    def resize(self, layer: nn.Module) -> None:
        """Make the layer's size attributes (``in_features``, ``num_features``...) match its shrunk tensors.

        Args:
            layer: the layer, its tensors already cut.
        """

    def trace(self, tracer: Tracer, layer: nn.Module, name: str, args: tuple, kwargs: dict,
              outs: list[torch.Tensor]) -> None:
        """Claim the layer's tensor dims with the channel ids of its input (``args[0]``) and label its outputs;
        built-in rules whose claims depend on more than two tables (grouped convs, attention) override it.

        Args:
            tracer: the running dependency-graph tracer.
            layer: the layer.
            name: its qualified name in the model.
            args: its positional inputs, a tensor first.
            kwargs: its keyword inputs.
            outs: the tensors it returned.
        """
        x = args[0]
        in_ids = tracer.channel_ids(x, self.channel_dim, name)
        self.claim_all(tracer, layer, name, self.in_channels(layer), in_ids, source=False)
        if self.keeps_channels:
            return self.pass_through(tracer, x, outs)
        dims = {t: d for t, d in self.out_channels(layer).items() if isinstance(getattr(layer, t, None), torch.Tensor)}
        ids = np.zeros(0, dtype=np.int64)
        if dims:
            first, dim = next(iter(dims.items()))
            ids = tracer.source(name, getattr(layer, first).shape[dim])
            self.claim_all(tracer, layer, name, dims, ids, source=True)
        tracer.label_outputs(outs, ids, self.channel_dim)

    def pass_through(self, tracer: Tracer, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """The first output, if shaped like the input ``x``, carries its channels."""
        label = tracer.get(x)
        for o in outs[:1]:
            tracer.set(o, label if label is not None and o.shape == x.shape else None)

    def claim_all(self, tracer: Tracer, layer: nn.Module, name: str, dims: dict[str, int], ids: np.ndarray, *,
                  source: bool) -> None:
        """Claim each ``tensor: dim`` with ``ids`` (``source``: the first one produces them); a dim of another size
        pins them."""
        for i, (tensor, dim) in enumerate(dims.items()):
            t = getattr(layer, tensor, None)
            if isinstance(t, torch.Tensor) and t.shape[dim] != len(ids):
                tracer.pin(ids, f"{name}: {tensor} dim {dim} has {t.shape[dim]} positions, not {len(ids)} channels")
                continue
            tracer.claim(layer, tensor, dim, ids, name, role=self.roles.get(tensor), source=source and i == 0)


class LinearRule(LayerRule):
    """``nn.Linear``: weight [out, in]."""

    def in_channels(self, layer: nn.Module) -> dict[str, int]:
        return {"weight": 1}

    def out_channels(self, layer: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0}

    def resize(self, layer: nn.Module) -> None:
        layer.out_features, layer.in_features = layer.weight.shape


class HFConv1DRule(LayerRule):
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer storing its weight [in, out]."""

    def in_channels(self, layer: nn.Module) -> dict[str, int]:
        return {"weight": 0}

    def out_channels(self, layer: nn.Module) -> dict[str, int]:
        return {"weight": 1, "bias": 0}

    def resize(self, layer: nn.Module) -> None:
        layer.nx, layer.nf = layer.weight.shape


class ConvRule(LayerRule):
    """``nn.Conv1d/2d/3d`` (not transposed): weight [out, in / groups, ...]; depthwise convs pass their channels
    through, grouped ones keep equal counts per group."""

    channel_dim = 1

    def accepts(self, layer: nn.Module) -> bool:
        return not layer.transposed

    def trace(self, tracer: Tracer, layer: nn.Module, name: str, args: tuple, kwargs: dict,
              outs: list[torch.Tensor]) -> None:
        x, groups, spatial = args[0], layer.groups, len(layer.kernel_size)
        in_ids = tracer.channel_ids(x, x.dim() - spatial - 1, name)
        if groups == 1:
            tracer.claim(layer, "weight", 1, in_ids, name)
            ids = tracer.source(name, layer.out_channels)
            tracer.claim(layer, "weight", 0, ids, name, source=True)
        elif groups == layer.in_channels:
            ids = np.repeat(in_ids, layer.out_channels // groups)
            tracer.claim(layer, "weight", 0, ids, name)
        else:
            tracer.claim(layer, "weight", 1, in_ids, name, blocks=groups, grouped=groups)
            ids = tracer.source(name, layer.out_channels)
            tracer.claim(layer, "weight", 0, ids, name, source=True, blocks=groups)
        tracer.claim(layer, "bias", 0, ids, name, blocks=1 if groups in (1, layer.in_channels) else groups)
        if outs:
            tracer.label_outputs(outs, ids, outs[0].dim() - spatial - 1)

    def resize(self, layer: nn.Module) -> None:
        w = layer.weight
        if 1 < layer.groups == layer.in_channels:  # depthwise: groups follow the channels
            layer.groups = layer.in_channels = w.shape[0] // (layer.out_channels // layer.groups)
        else:
            layer.in_channels = w.shape[1] * layer.groups
        layer.out_channels = w.shape[0]


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: weight [vocabulary, dim]; the vocabulary stays."""

    def trace(self, tracer: Tracer, layer: nn.Module, name: str, args: tuple, kwargs: dict,
              outs: list[torch.Tensor]) -> None:
        ids = tracer.source(name, layer.embedding_dim)
        tracer.claim(layer, "weight", 1, ids, name, source=True)
        tracer.claim(layer, "weight", 0, np.full(layer.num_embeddings, -1), name)
        tracer.label_outputs(outs, ids, -1)

    def resize(self, layer: nn.Module) -> None:
        layer.embedding_dim = layer.weight.shape[1]


class BatchNormRule(LayerRule):
    """``nn.BatchNorm*``: affine parameters and running statistics follow the channels."""

    channel_dim = 1
    keeps_channels = True
    roles = {"weight": "bn_weight"}

    def in_channels(self, layer: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}

    def resize(self, layer: nn.Module) -> None:
        layer.num_features = (layer.weight if layer.weight is not None else layer.running_mean).shape[0]


class GroupNormRule(LayerRule):
    """``nn.GroupNorm``: channels are normalized per group, so each group keeps an equal count."""

    def trace(self, tracer: Tracer, layer: nn.Module, name: str, args: tuple, kwargs: dict,
              outs: list[torch.Tensor]) -> None:
        x = args[0]
        ids = tracer.channel_ids(x, 1, name)
        if layer.affine:
            tracer.claim(layer, "weight", 0, ids, name, blocks=layer.num_groups)
            tracer.claim(layer, "bias", 0, ids, name, blocks=layer.num_groups)
        else:
            tracer.pin(ids, f"{name}: GroupNorm without affine parameters keeps its channels")
        self.pass_through(tracer, x, outs)

    def resize(self, layer: nn.Module) -> None:
        layer.num_channels = layer.weight.shape[0]


class NormRule(LayerRule):
    """A norm over the last dim with a per-channel weight (any ``*RMSNorm``); over several dims it pins them."""

    keeps_channels = True
    roles = {"weight": "norm"}

    def trace(self, tracer: Tracer, layer: nn.Module, name: str, args: tuple, kwargs: dict,
              outs: list[torch.Tensor]) -> None:
        shape = getattr(layer, "normalized_shape", None)
        if getattr(layer, "weight", None) is None or (shape is not None and len(shape) != 1):
            label = tracer.get(args[0])
            tracer.pin([] if label is None else label, f"{name}: {type(layer).__name__} over several dims or "
                       "without a weight keeps its channels")
            return self.pass_through(tracer, args[0], outs)
        super().trace(tracer, layer, name, args, kwargs, outs)

    def in_channels(self, layer: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0}


class LayerNormRule(NormRule):
    """``nn.LayerNorm`` / ``nn.RMSNorm``: ``normalized_shape`` follows the weight."""

    def resize(self, layer: nn.Module) -> None:
        layer.normalized_shape = (layer.weight.shape[0],)


class LayoutRule(LayerRule):
    """A module traced as one unit (attention, a fused MLP, MoE experts) from its ``HeadLayout``; its head counts
    are patched by structured pruning (``hf_layouts.patch_unit``), which also reports them."""

    def trace(self, tracer: Tracer, layer: nn.Module, name: str, args: tuple, kwargs: dict,
              outs: list[torch.Tensor]) -> None:
        layout: HeadLayout = unit_layout(layer)
        tracer.layouts[name] = layout
        for sub, tensor, dim, source in layout.inputs:
            if isinstance(src := unit_input(source, args, kwargs), torch.Tensor):
                hidden = tracer.channel_ids(src, -1, name)
                tracer.pin(hidden, "it is a transformer's hidden size (the residual stream), which stays")
                tracer.claim(layer.get_submodule(sub), tensor, dim, hidden, name)
        units = tracer.source(name, layout.units)
        per_head = np.repeat(units, layout.heads_per_unit)
        if layout.reason:
            tracer.pin(units, layout.reason)
        for i, s in enumerate(layout.heads):
            tracer.claim(layer.get_submodule(s.module), s.tensor, s.dim, s.positions(units), name, source=i == 0)
        for key, t in ((k, kwargs.get(k)) for k in layout.head_inputs if isinstance(kwargs.get(k), torch.Tensor)):
            ids = tracer.channel_ids(t, 1, name) if t.dim() > 1 and t.shape[1] == len(per_head) else -1
            tracer.union(ids, per_head)
            tracer.pin(np.where(np.asarray(ids) < 0, per_head, -1), f"{name}: its heads meet a fixed-size {key}")
        out_ids = np.repeat(units, layout.heads_per_unit * layout.head_dim)
        for i, (sub, tensor, dim) in enumerate(layout.outputs):
            proj, oname = layer.get_submodule(sub), f"{name}.{layout.outputs[0][0] or layout.outputs[0][1]}"
            out_ids = out_ids if i else tracer.source(oname, getattr(proj, tensor).shape[dim])
            tracer.claim(proj, tensor, dim, out_ids, oname, source=i == 0)
        tracer.label_outputs(outs[:1], out_ids, -1)
        for o in outs[1:]:
            tracer.set(o, along(per_head, o.dim(), 1) if o.dim() == 4 and o.shape[1] == len(per_head) else None)


def _is_rmsnorm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1 \
        and not any(True for _ in module.children())


_RULES: dict[type, LayerRule] = {
    nn.Linear: LinearRule(), nn.modules.conv._ConvNd: ConvRule(), nn.Embedding: EmbeddingRule(),
    nn.modules.batchnorm._BatchNorm: BatchNormRule(), nn.GroupNorm: GroupNormRule(), nn.LayerNorm: LayerNormRule(),
    nn.RMSNorm: LayerNormRule()}
"""Layer type -> rule: the built-in layers here, users' via ``register_layer``; a layer takes the rule of the first
type in its class's MRO that has one."""

_MATCHED: tuple[tuple[Callable[[nn.Module], Any], LayerRule], ...] = (
    (unit_layout, LayoutRule()), (is_hf_conv1d, HFConv1DRule()), (_is_rmsnorm, NormRule()))
"""Layers matched by structure rather than type (other libraries' classes), tried in order after ``_RULES``."""


def register_layer(cls: type[nn.Module], rule: LayerRule | None) -> LayerRule | None:
    """Teach structured pruning how to prune ``cls`` (and its subclasses without a rule of their own).

    Args:
        cls: the layer class, a subclass of ``torch.nn.Module``.
        rule: a ``LayerRule`` instance saying which of its tensor dims hold its channels and how it resizes; None
            removes the registration.

    Returns:
        The rule registered for ``cls`` before (None if there was none): pass it back to restore it.

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass, or ``rule`` is not a ``LayerRule`` instance or None.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls: expected a subclass of torch.nn.Module, got {cls!r}")
    if isinstance(rule, type) and issubclass(rule, LayerRule):
        raise TypeError(f"rule: expected a LayerRule instance, got the class {rule.__name__}; pass {rule.__name__}()")
    if rule is not None and not isinstance(rule, LayerRule):
        raise TypeError(f"rule: expected a LayerRule instance or None, got {type(rule).__name__}")
    previous = _RULES.pop(cls, None)
    if rule is not None:
        _RULES[cls] = rule
    return previous


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule structured pruning uses for ``module``, None when it has none (or its rule refuses it).

    Args:
        module: any module.

    Returns:
        The registered rule of its type (the nearest class in its MRO), else the first built-in structural match.
    """
    for cls in type(module).__mro__:
        if cls in _RULES:
            rule = _RULES[cls]
            return rule if rule.accepts(module) else None
    return next((rule for match, rule in _MATCHED if match(module)), None)

