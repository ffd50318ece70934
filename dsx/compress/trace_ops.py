"""Per-op channel propagation for the dependency-graph tracer: which torch ops dsx follows and how ids move.

Kept apart from the tracer and the layer rules so that teaching dsx a new op touches only these tables and rules.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree


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


def op_name(func: Callable) -> str:
    """The name the op tables use for ``func``: ``x + y`` is "add", ``x.add_`` is "add", ``x.T`` is "attr:T".

    Args:
        func: the function a TorchFunctionMode sees.

    Returns:
        Its table name.
    """
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":
        return f"attr:{owner.__name__}"
    name = getattr(func, "__name__", "")
    if name in _DUNDER:
        return _DUNDER[name]
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name.lstrip("_")


def along(ids: np.ndarray | torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """A label of ``ndim`` dims holding ``ids`` along ``dim``.

    Args:
        ids: one channel id per position (-1: fixed).
        ndim: the labelled tensor's number of dims.
        dim: the dim holding the channels.

    Returns:
        The label, size 1 along every other dim.
    """
    shape = [1] * ndim
    shape[dim] = len(ids)
    return torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(shape)


def varying_dims(label: torch.Tensor | None) -> list[int]:
    """The dims along which ``label`` (None: no label) holds several ids.

    Args:
        label: a compact label or None.

    Returns:
        Those dims, in order.
    """
    return [] if label is None else [d for d in range(label.dim()) if label.shape[d] > 1]


def compact(label: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``label`` with ``len(shape)`` dims, reduced to size 1 along every dim it is constant on.

    Args:
        label: a label, possibly with fewer dims than the tensor it labels.
        shape: that tensor's shape.

    Returns:
        The compact label.
    """
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


class OpTracing:
    """The op half of the tracer: labels each op's outputs from its inputs' labels, or pins what it cannot follow.

    Mixed into the tracer, which provides ``get`` / ``set`` (a tensor's label), ``pin`` and ``union`` (of ids) and
    ``names`` (parameter and buffer ids).
    """

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
        varying = varying_dims(label)
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
        varying = {d for lb in labels for d in varying_dims(lb)}
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
        in_varying = max(len(varying_dims(self.get(t))) for t in inputs)
        reason = None
        for o, r in zip(outs, results):
            r = compact(r, o.shape)
            out_varying = varying_dims(r)
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
        if any(d in varying_dims(label) for d in padded):
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
        if any(d in varying_dims(label) for d in dims):
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
        if any(d >= x.dim() - spatial for d in varying_dims(label)):
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
        va, vb = varying_dims(la), varying_dims(lb)
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
