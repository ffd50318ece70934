"""Channel dependency graph for structured pruning: which weight dims must shrink together, found by one traced run.

Every activation carries an integer label tensor (one id per channel) that follows each torch op; layers claim the
dims of their weights, adds and products merge ids, and channels reaching anything not understood stay fixed.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from dsx.compress.hf import HeadLayout, unit_input
from dsx.compress.hf_layouts import unit_layout
from dsx.core.inputs import Inputs, run_model, tensor_leaves
from dsx.core.modules import is_hf_conv1d
from dsx.core.transform import eval_mode

LOOSE_LIMIT = 1 << 16
"""Parameters used directly in ops (not through a known layer) are followed per element up to this size."""


@dataclass
class Claim:
    """One dim of a weight (``dim=None``: every element of a loose parameter) and the channel of each position.

    ``ids`` hold tracer ids while tracing and class indices in a built graph; -1 marks a fixed position.
    ``owner``: the layer (or attention module) a group rooted here is named after; ``modules``: the modules using
    the tensor; ``role``: "weight", "bias", "bn_weight", "norm", "stat" (running statistics) or "loose";
    ``source``: the dim produces new channels (a layer's outputs);
    ``blocks``: the positions form equal contiguous blocks that must keep equal counts (grouped conv, GroupNorm);
    ``grouped``: a grouped conv's input dim, whose tensor dim holds positions // grouped entries.
    """

    tensor: str
    dim: int | None
    ids: np.ndarray
    owner: str
    modules: set[str]
    role: str
    source: bool = False
    blocks: int = 1
    grouped: int = 1


@dataclass
class Group:
    """Channels (neurons, heads) that are kept or removed as units; all units touch the same claims alike.

    ``key``: the owner of the first claim that produces them (a layer or attention module name); ``width``:
    positions per unit in that claim; ``footprint``: (claim index, positions per unit) for every claim touched;
    ``blocks``: each unit's block index when blocks must keep equal counts; ``reason``: why it is not pruned.
    """

    key: str
    classes: np.ndarray
    width: int
    footprint: list[tuple[int, int]]
    blocks: np.ndarray | None = None
    reason: str | None = None

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def nblocks(self) -> int:
        return 1 if self.blocks is None else int(self.blocks.max()) + 1


@dataclass
class DepGraph:
    """The result of ``build_depgraph``: claims (ids mapped to classes), the groups, the modules traced as units
    (attention, fused MLPs, MoE experts: patched after shrinking) with their layouts and the model's output shapes."""

    claims: list[Claim]
    groups: list[Group]
    num_classes: int
    layouts: dict[str, HeadLayout] = field(default_factory=dict)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)


def matches(name: str, pattern: str) -> bool:
    """``pattern`` names ``name`` or one of its parents, or is ``"re:<regex>"`` fully matching one of them."""
    parts = name.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
    if pattern.startswith("re:"):
        return any(re.fullmatch(pattern[3:], n) for n in names)
    return pattern in names


_DUNDER = {"__add__": "add", "__radd__": "add", "__iadd__": "add", "__sub__": "sub", "__rsub__": "sub",
           "__isub__": "sub", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "__truediv__": "div",
           "__rtruediv__": "div", "__itruediv__": "div", "__floordiv__": "div", "__rfloordiv__": "div",
           "__pow__": "pow", "__rpow__": "pow", "__neg__": "neg", "__abs__": "abs", "__and__": "and",
           "__or__": "or", "__xor__": "xor", "__invert__": "invert", "__eq__": "eq", "__ne__": "ne", "__lt__": "lt",
           "__le__": "le", "__gt__": "gt", "__ge__": "ge", "__getitem__": "getitem", "__matmul__": "matmul",
           "__rmatmul__": "rmatmul", "__mod__": "remainder", "__setitem__": "setitem", "__len__": "len"}
_CAST = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone", "detach", "cpu",
         "cuda", "requires_grad", "attr:data", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
         "randn_like"}
_ELEMENTWISE = set(
    "add sub mul div true_divide floor_divide remainder fmod pow where maximum minimum fmax fmin clamp clip clamp_min "
    "clamp_max relu relu6 gelu silu sigmoid tanh hardtanh hardswish hardsigmoid leaky_relu elu selu celu mish "
    "softplus softsign logsigmoid tanhshrink softshrink hardshrink threshold exp expm1 log log1p log2 log10 neg "
    "negative abs sqrt rsqrt square sin cos erf erfc reciprocal sign floor ceil round trunc frac dropout "
    "alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d masked_fill addcmul addcdiv lerp eq ne lt gt "
    "le ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_xor bitwise_not and or xor "
    "invert nan_to_num isnan isinf isfinite xlogy hypot atan2 copysign".split())
_STRUCTURAL = set(
    "view reshape view_as reshape_as flatten unflatten permute transpose swapaxes swapdims t unsqueeze squeeze "
    "expand expand_as broadcast_to repeat tile getitem narrow select split split_with_sizes tensor_split chunk "
    "unbind cat concat concatenate stack hstack vstack flip movedim moveaxis index_select repeat_interleave attr:T "
    "attr:mT".split())
_SEQUENCE = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_SIZED = {"view", "reshape", "expand", "broadcast_to"}
_REDUCE = set("mean sum nansum amax amin max min argmax argmin prod var std logsumexp all any".split())
_KEEPSHAPE = {"softmax", "log_softmax", "cumsum", "cumprod", "normalize"}
_MATMUL = {"matmul", "mm", "bmm", "rmatmul"}
_SPATIAL = re.compile(r"(adaptive_)?(avg|max|lp)_pool([123])d(_with_indices)?|interpolate|upsample\w*")


def _op_name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":
        return f"attr:{owner.__name__}"
    name = getattr(func, "__name__", "")
    if name in _DUNDER:
        return _DUNDER[name]
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name.lstrip("_")


def _along(ids: np.ndarray | torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """A label of ``ndim`` dims holding ``ids`` along ``dim``."""
    shape = [1] * ndim
    shape[dim] = len(ids)
    return torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(shape)


def _varying(label: torch.Tensor | None) -> list[int]:
    return [] if label is None else [d for d in range(label.dim()) if label.shape[d] > 1]


def _compress(label: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``label`` with ``len(shape)`` dims, reduced to size 1 along every dim it is constant on."""
    label = label.reshape((1,) * (len(shape) - label.dim()) + tuple(label.shape)) if label.dim() < len(shape) \
        else label
    for d in range(label.dim()):
        if label.shape[d] > 1 and bool((label == label.narrow(d, 0, 1)).all()):
            label = label.narrow(d, 0, 1)
    return label.contiguous()


def _sizes(args: tuple, kwargs: dict) -> list[Any]:
    rest = kwargs.get("shape", kwargs.get("size", args[1:]))
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        rest = rest[0]
    return list(rest)


def _dims(dim: Any, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(ndim, 1) for d in dims)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The smallest id in each id's connected component, for ``n`` ids joined by ``pairs`` [k, 2]."""
    root = np.arange(n)
    if not len(pairs):
        return root
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        low = np.minimum(root[a], root[b])
        new = root.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        np.minimum.at(new, root, new)
        while not np.array_equal(new, new[new]):
            new = new[new]
        if np.array_equal(new, root):
            return root
        root = new


class _Shape(tuple):
    """A labelled tensor's shape that reports which dims forward code reads (``torch.Size`` cannot be subclassed)."""

    def __new__(cls, size: torch.Size, on_read: Callable[[Sequence[int]], None]) -> _Shape:
        shape = super().__new__(cls, size)
        shape.on_read = on_read
        return shape

    def __getitem__(self, i: Any) -> Any:
        self.on_read(range(len(self))[i] if isinstance(i, slice) else [i % len(self)])
        item = tuple.__getitem__(self, i)
        return torch.Size(item) if isinstance(i, slice) else item

    def __iter__(self) -> Any:
        self.on_read(range(len(self)))
        return tuple.__iter__(self)

    def numel(self) -> int:
        self.on_read(range(len(self)))
        return int(np.prod(self))


class _Tracer(TorchFunctionMode):
    """Runs the model once, following channel ids through ops (a TorchFunctionMode) and known layers (hooks)."""

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
        self.pins: list[tuple[np.ndarray, str]] = []
        self.claims: dict[tuple[str, int | None], Claim] = {}
        self.by_tensor: dict[str, list[Claim]] = defaultdict(list)
        self.sources: dict[str, np.ndarray] = {}
        self.layouts: dict[str, HeadLayout] = {}
        self.depth = 0

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
            self.pins.append((ids, reason))

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

        self.labels[key] = (weakref.ref(t, drop), _compress(label, t.shape))

    def param_label(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """A parameter used directly in an op: its layer claims if any, else (a loose parameter) one id per element."""
        claims = self.by_tensor.get(name)
        if claims:
            labelled = [c for c in claims if (c.ids >= 0).any()]
            if not labelled:
                return None
            if len(labelled) == 1 and labelled[0].dim is not None:
                return _along(labelled[0].ids, t.dim(), labelled[0].dim)
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
        others = [d for d in _varying(label) if d != dim]
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
    def is_unit(self, module: nn.Module) -> bool:
        if unit_layout(module) is not None:
            return True
        if isinstance(module, nn.modules.conv._ConvNd):
            return not module.transposed
        return isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                                   nn.RMSNorm, nn.Embedding)) or is_hf_conv1d(module) or _is_rmsnorm(module)

    def unit(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        name = self.module_names[id(module)]
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input", next(iter(kwargs.values()), None)))
        outs = tensor_leaves(out)
        if not isinstance(x, torch.Tensor):  # its weights stay unclaimed, its outputs fixed
            return self.label_outputs(outs, np.zeros(0, dtype=np.int64), 0)
        if (layout := unit_layout(module)) is not None:
            return self.layout_unit(module, name, layout, (x, *args[1:]), kwargs, outs)
        if isinstance(module, nn.Linear) or is_hf_conv1d(module):
            linear = isinstance(module, nn.Linear)
            self.claim(module, "weight", 1 if linear else 0, self.channel_ids(x, -1, name), name)
            ids = self.source(name, module.weight.shape[0 if linear else 1])
            self.claim(module, "weight", 0 if linear else 1, ids, name, source=True)
            self.claim(module, "bias", 0, ids, name)
            return self.label_outputs(outs, ids, -1)
        if isinstance(module, nn.modules.conv._ConvNd):
            return self.conv_unit(module, name, x, outs)
        if isinstance(module, nn.Embedding):
            ids = self.source(name, module.embedding_dim)
            self.claim(module, "weight", 1, ids, name, source=True)
            self.claim(module, "weight", 0, np.full(module.num_embeddings, -1), name)
            return self.label_outputs(outs, ids, -1)
        self.norm_unit(module, name, x, outs)

    def label_outputs(self, outs: list[torch.Tensor], ids: np.ndarray, dim: int) -> None:
        """The first output carries ``ids`` along ``dim``; any other output is fixed."""
        for i, o in enumerate(outs):
            self.set(o, _along(ids, o.dim(), dim % o.dim()) if i == 0 and o.dim() and o.shape[dim] == len(ids)
                     else None)

    def conv_unit(self, module: nn.modules.conv._ConvNd, name: str, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        ch = x.dim() - len(module.kernel_size) - 1
        in_ids = self.channel_ids(x, ch, name)
        groups = module.groups
        if groups == 1:
            self.claim(module, "weight", 1, in_ids, name)
            ids = self.source(name, module.out_channels)
            self.claim(module, "weight", 0, ids, name, source=True)
        elif groups == module.in_channels:
            ids = np.repeat(in_ids, module.out_channels // groups)
            self.claim(module, "weight", 0, ids, name)
        else:
            self.claim(module, "weight", 1, in_ids, name, blocks=groups, grouped=groups)
            ids = self.source(name, module.out_channels)
            self.claim(module, "weight", 0, ids, name, source=True, blocks=groups)
        self.claim(module, "bias", 0, ids, name, blocks=1 if groups in (1, module.in_channels) else groups)
        if outs:
            self.label_outputs(outs, ids, outs[0].dim() - len(module.kernel_size) - 1)

    def norm_unit(self, module: nn.Module, name: str, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        label = self.get(x)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            ids = self.channel_ids(x, 1, name)
            self.claim(module, "weight", 0, ids, name, role="bn_weight")
            for t in ("bias", "running_mean", "running_var"):
                self.claim(module, t, 0, ids, name)
        elif isinstance(module, nn.GroupNorm):
            ids = self.channel_ids(x, 1, name)
            if module.affine:
                self.claim(module, "weight", 0, ids, name, blocks=module.num_groups)
                self.claim(module, "bias", 0, ids, name, blocks=module.num_groups)
            else:
                self.pin(ids, f"{name}: GroupNorm without affine parameters keeps its channels")
        else:
            shape = getattr(module, "normalized_shape", None)
            weight = getattr(module, "weight", None)
            if weight is None or (shape is not None and len(shape) != 1):
                self.pin([] if label is None else label, f"{name}: {type(module).__name__} over several dims "
                         "or without a weight keeps its channels")
            else:
                ids = self.channel_ids(x, -1, name)
                self.claim(module, "weight", 0, ids, name, role="norm")
                self.claim(module, "bias", 0, ids, name)
        for o in outs[:1]:
            self.set(o, label if label is not None and o.shape == x.shape else None)

    def layout_unit(self, module: nn.Module, name: str, layout: HeadLayout, args: tuple, kwargs: dict,
                    outs: list[torch.Tensor]) -> None:
        self.layouts[name] = layout
        for sub, tensor, dim, source in layout.inputs:
            if isinstance(src := unit_input(source, args, kwargs), torch.Tensor):
                hidden = self.channel_ids(src, -1, name)
                self.pin(hidden, "it is a transformer's hidden size (the residual stream), which stays")
                self.claim(module.get_submodule(sub), tensor, dim, hidden, name)
        units = self.source(name, layout.units)
        per_head = np.repeat(units, layout.heads_per_unit)
        if layout.reason:
            self.pin(units, layout.reason)
        for i, s in enumerate(layout.heads):
            self.claim(module.get_submodule(s.module), s.tensor, s.dim, s.positions(units), name, source=i == 0)
        for key, t in ((k, kwargs.get(k)) for k in layout.head_inputs if isinstance(kwargs.get(k), torch.Tensor)):
            ids = self.channel_ids(t, 1, name) if t.dim() > 1 and t.shape[1] == len(per_head) else -1
            self.union(ids, per_head)
            self.pin(np.where(np.asarray(ids) < 0, per_head, -1), f"{name}: its heads meet a fixed-size {key}")
        out_ids = np.repeat(units, layout.heads_per_unit * layout.head_dim)
        for i, (sub, tensor, dim) in enumerate(layout.outputs):
            proj, oname = module.get_submodule(sub), f"{name}.{layout.outputs[0][0] or layout.outputs[0][1]}"
            out_ids = out_ids if i else self.source(oname, getattr(proj, tensor).shape[dim])
            self.claim(proj, tensor, dim, out_ids, oname, source=i == 0)
        self.label_outputs(outs[:1], out_ids, -1)
        for o in outs[1:]:
            self.set(o, _along(per_head, o.dim(), 1) if o.dim() == 4 and o.shape[1] == len(per_head) else None)

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

    # ops ------------------------------------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        self.depth += 1  # the tracer's own tensor ops run untraced
        try:
            return self.after(_op_name(func), func, args, kwargs, out)
        finally:
            self.depth -= 1

    def after(self, name: str, func: Callable, args: tuple, kwargs: dict, out: Any) -> Any:
        """Label the outputs of one op from its inputs' labels; returns ``out`` (a shape read: a watched shape)."""
        if isinstance(out, (torch.Size, int)):
            watched = args and isinstance(args[0], torch.Tensor) and id(args[0]) not in self.names
            return self.watch(name, args, kwargs, out) if watched else out
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs and name != "setitem":
            return out
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not any(self.get(t) is not None for t in ins):
            for o in outs:
                self.set(o, None)
        elif name == "setitem":
            self.unknown("an indexed assignment (x[...] = ...)", ins, outs)
        else:
            try:
                self.follow(name, func, args, kwargs, ins, outs)
            except Exception as e:  # a rule that cannot follow this call must not break the trace
                self.unknown(f"{name} ({type(e).__name__}: {e})", ins, outs)
        return out

    def watch(self, name: str, args: tuple, kwargs: dict, out: Any) -> Any:
        """Forward code reading a channel count into Python could hard-code it anywhere: pin those channels."""
        label = self.get(args[0])
        varying = _varying(label)
        if not varying:
            return out

        def on_read(dims: Sequence[int]) -> None:
            if any(d in varying for d in dims):
                self.pin(label, "forward code reads its channel count (x.shape / x.size())")

        if name in ("attr:shape", "size") and isinstance(out, torch.Size):
            return _Shape(out, on_read)
        if name in ("size", "len", "numel"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            on_read(range(label.dim()) if name == "numel" else [0 if dim is None else dim % label.dim()])
        return out

    def follow(self, name: str, func: Callable, args: tuple, kwargs: dict, ins: list[torch.Tensor],
               outs: list[torch.Tensor]) -> None:
        binary = len(args) > 1 and isinstance(args[1], torch.Tensor)
        if name in _CAST:
            if len(outs) == 1 and outs[0].shape == args[0].shape:
                self.set(outs[0], self.get(args[0]))
            else:
                self.unknown(name, ins, outs)
        elif name in _ELEMENTWISE or (name in ("max", "min") and binary):
            if len(outs) != 1:
                return self.unknown(name, ins, outs)
            self.set(outs[0], self.merge([(self.get(t), t.shape) for t in ins], outs[0].shape, name))
        elif name in _STRUCTURAL:
            self.structural(name, func, args, kwargs, outs)
        elif name == "pad":
            self.pad(args, kwargs, outs)
        elif name in _REDUCE or name in _KEEPSHAPE:
            self.reduce(name, args, kwargs, outs)
        elif _SPATIAL.fullmatch(name):
            self.spatial(name, args[0], outs)
        elif name in _MATMUL:
            a, b = (args[1], args[0]) if name == "rmatmul" else (args[0], args[1])
            self.matmul(a, b, outs)
        else:
            self.unknown(name, ins, outs)

    def unknown(self, name: str, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        for t in ins:
            label = self.get(t)
            if label is not None:
                self.pin(label, f"its channels reach {name}, which dsx does not follow")
        for o in outs:
            self.set(o, None)

    def merge(self, items: list[tuple[torch.Tensor | None, Sequence[int]]], out_shape: Sequence[int],
              name: str) -> torch.Tensor | None:
        """Elementwise: ids meeting at a position are merged; ids meeting a fixed, non-broadcast operand are pinned."""
        nd = len(out_shape)
        labels, shapes = [], []
        for label, shape in items:
            shape = (1,) * (nd - len(shape)) + tuple(shape)
            label = torch.full((1,) * nd, -1, dtype=torch.int64) if label is None else \
                label.reshape((1,) * (nd - label.dim()) + tuple(label.shape))
            labels.append(label)
            shapes.append(shape)
        if all(not bool((lb >= 0).any()) for lb in labels):
            return None
        varying = {d for lb in labels for d in _varying(lb)}
        full = torch.broadcast_shapes(*(lb.shape for lb in labels))
        expanded = [lb.expand(full) for lb in labels]
        out = torch.stack(expanded).amax(0)
        for lb, shape, ex in zip(labels, shapes, expanded):
            self.union(ex.numpy(), out.numpy())
            fixed = ex < 0
            if not bool(fixed.any()):
                continue
            constrains = any(shape[d] == out_shape[d] > 1 for d in varying) if varying else \
                any(s > 1 for s in shape)
            if constrains:
                self.pin(out[fixed & (out >= 0)], f"its channels meet a fixed-size tensor in {name}")
        return out

    def structural(self, name: str, func: Callable, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        """Shape and indexing ops: apply the op to the labels themselves."""
        def expanded(t: torch.Tensor) -> torch.Tensor:
            label = self.get(t)
            return (torch.full((1,) * t.dim(), -1, dtype=torch.int64) if label is None else label).expand(t.shape)

        inputs = list(args[0]) if name in _SEQUENCE else [args[0]]
        labelled = [expanded(t) for t in inputs]
        largs = ((type(args[0])(labelled),) if name in _SEQUENCE else (labelled[0],)) + tuple(args[1:])
        fn = torch.Tensor.reshape if name == "view" else func
        results = [r for r in pytree.tree_leaves(fn(*largs, **kwargs)) if isinstance(r, torch.Tensor)]
        in_ids = torch.cat([lb.reshape(-1) for lb in labelled]).unique()
        in_ids = in_ids[in_ids >= 0]
        in_varying = max(len(_varying(self.get(t))) for t in inputs)
        reason = None
        for o, r in zip(outs, results):
            r = _compress(r, o.shape)
            out_varying = _varying(r)
            if len(out_varying) > in_varying:
                reason = f"{name} splits channels over several dims"
            elif not bool(torch.isin(in_ids, r).all()):
                reason = f"{name} selects a part of the channels"
            elif name in _SIZED or name == "unflatten":
                at = args[1] % args[0].dim() if name == "unflatten" else 0
                sizes = _sizes(args, kwargs) if name in _SIZED else [None] * at + list(args[2])
                if any(d < len(sizes) and sizes[d] not in (-1, None) for d in out_varying):
                    reason = f"{name} gives the channel dim a fixed size (use flatten or -1 to let it shrink)"
            self.set(o, r)
        if reason is not None:
            self.pin(in_ids, reason)

    def pad(self, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        x, pads = args[0], args[1] if len(args) > 1 else kwargs["pad"]
        label = self.get(x)
        padded = [x.dim() - 1 - i // 2 for i, p in enumerate(pads) if p]
        if any(d in _varying(label) for d in padded):
            self.pin(label, "pad adds channels")
            self.set(outs[0], None)
        else:
            self.set(outs[0], label)

    def reduce(self, name: str, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        x = args[0]
        label = self.get(x)
        if name == "normalize":
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
        else:
            dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.dtype) else None)
        dims = _dims(dim, x.dim())
        if any(d in _varying(label) for d in dims):
            self.pin(label, f"{name} reduces over the channels")
            label = None
        elif label is not None and name not in _KEEPSHAPE:
            keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
            if not keepdim:
                label = label.reshape([s for d, s in enumerate(label.shape) if d not in dims])
        for o in outs:
            self.set(o, label if label is not None and label.dim() == o.dim() else None)

    def spatial(self, name: str, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        label = self.get(x)
        digit = re.search(r"([123])d", name)
        spatial = int(digit.group(1)) if digit else x.dim() - 2
        if any(d >= x.dim() - spatial for d in _varying(label)):
            self.pin(label, f"{name} mixes channels with spatial positions")
            label = None
        for o in outs:
            self.set(o, label if label is not None and o.dim() == x.dim() else None)

    def matmul(self, a: torch.Tensor, b: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """a [..., n, k] @ b [..., k, m]: ids along k meet pairwise; the other dims carry through to the output."""
        if a.dim() < 2 or b.dim() < 2 or len(outs) != 1:
            return self.unknown("matmul", [a, b], outs)
        la, lb = (self.get(t) for t in (a, b))
        la = torch.full((1,) * a.dim(), -1, dtype=torch.int64) if la is None else la
        lb = torch.full((1,) * b.dim(), -1, dtype=torch.int64) if lb is None else lb
        va, vb = _varying(la), _varying(lb)
        a_k, b_k = a.dim() - 1 in va, b.dim() - 2 in vb
        if (a_k and len(va) > 1) or (b_k and len(vb) > 1):
            return self.unknown("matmul", [a, b], outs)
        ka = la.reshape(-1).numpy() if a_k else la.reshape(-1)[:1].numpy()
        kb = lb.reshape(-1).numpy() if b_k else lb.reshape(-1)[:1].numpy()
        ka, kb = np.broadcast_arrays(ka, kb)
        self.union(ka, kb)
        self.pin(np.where(kb < 0, ka, -1), "its channels are contracted with a fixed-size tensor")
        self.pin(np.where(ka < 0, kb, -1), "its channels are contracted with a fixed-size tensor")
        items = [(None if a_k else la, (*a.shape[:-1], 1)), (None if b_k else lb, (*b.shape[:-2], 1, b.shape[-1]))]
        self.set(outs[0], self.merge(items, outs[0].shape, "matmul"))

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
        _, cls = np.unique(_components(self.count, pairs), return_inverse=True)
        claims = list(self.claims.values())
        for c in claims:
            c.ids = np.where(c.ids >= 0, cls[np.maximum(c.ids, 0)], -1)
        pinned: dict[int, str] = {}
        for ids, reason in self.pins:
            for k in np.unique(cls[ids]).tolist():
                pinned.setdefault(k, reason)
        groups = _groups(claims, pinned)
        return DepGraph(claims, groups, int(cls.max()) + 1 if len(cls) else 0, self.layouts,
                        [tuple(t.shape) for t in leaves])


def _is_rmsnorm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1 \
        and not any(True for _ in module.children())


def _groups(claims: list[Claim], pinned: dict[int, str]) -> list[Group]:
    """Classes touching the same claims the same number of times form a group, in order of first appearance."""
    footprint: dict[int, list[tuple[int, int]]] = defaultdict(list)
    first: dict[int, tuple[int, int]] = {}
    for ci, c in enumerate(claims):
        valid = np.flatnonzero(c.ids >= 0)
        if not len(valid):
            continue
        uniq, idx, counts = np.unique(c.ids[valid], return_index=True, return_counts=True)
        for k, p, n in zip(uniq.tolist(), valid[idx].tolist(), counts.tolist()):
            footprint[k].append((ci, n))
            first.setdefault(k, (ci, p))
    by_footprint: dict[tuple, list[int]] = defaultdict(list)
    for k in sorted(footprint, key=first.__getitem__):
        if any(claims[ci].source for ci, _ in footprint[k]):
            by_footprint[tuple(footprint[k])].append(k)
    groups, used = [], Counter()
    for fp, classes in by_footprint.items():
        root = min(ci for ci, _ in fp if claims[ci].source)
        key = claims[root].owner
        used[key] += 1
        key = key if used[key] == 1 else f"{key}#{used[key]}"
        members = np.array(classes, dtype=np.int64)
        reason = next((pinned[k] for k in classes if k in pinned), None)
        blocks, why = _blocks(claims, fp, members)
        if reason is None and len(classes) < 2:
            reason = "it has a single channel"
        groups.append(Group(key, members, dict(fp)[root], list(fp), blocks, reason or why))
    return groups


def _blocks(claims: list[Claim], fp: tuple, members: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Each member's block where some claim needs equal counts per block, or the reason that cannot hold."""
    blocks = None
    for ci, _ in fp:
        c = claims[ci]
        if c.blocks == 1:
            continue
        why = "its channels form grouped-conv / GroupNorm blocks that cannot keep equal counts"
        if not np.isin(c.ids, members).all():
            return None, why
        size = len(c.ids) // c.blocks
        block_of = np.full(int(members.max()) + 1, -1)
        for b in range(c.blocks):
            part = np.unique(c.ids[b * size:(b + 1) * size])
            if (block_of[part] >= 0).any():
                return None, why
            block_of[part] = b
        mine = block_of[members]
        if blocks is not None and len(set(zip(blocks.tolist(), mine.tolist()))) != len(set(mine.tolist())):
            return None, why
        if len(set(np.bincount(mine).tolist())) != 1:
            return None, why
        blocks = mine
    return blocks, None


def build_depgraph(model: nn.Module, inputs: Inputs, *, skip: Sequence[str] = ()) -> DepGraph:
    """Trace ``model`` (in eval mode, no grad) on ``inputs`` and return its channel groups.

    Groups whose channels reach the model output, an op dsx does not follow, a fixed-size reshape or a ``skip``ped
    module (a name or ``"re:<regex>"``; a name covers its children) carry a ``reason`` and must not be pruned.
    """
    if isinstance(skip, str):
        raise TypeError("skip: expected a list of names or 're:' patterns, got a single string; wrap it in a list")
    names = [n for n, _ in model.named_modules()]
    for p in skip:
        if not any(matches(n, p) for n in names):
            warnings.warn(f"structured pruning: skip pattern {p!r} matches no module", stacklevel=3)
    tracer = _Tracer(model)
    handles = []
    for m in model.modules():
        if tracer.is_unit(m):
            handles.append(m.register_forward_pre_hook(tracer.enter, with_kwargs=True))
            handles.append(m.register_forward_hook(tracer.leave, with_kwargs=True))
    try:
        with eval_mode(model), tracer:
            out = run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return tracer.build(skip, out)
