"""Capture a model as ATen-level fx graphs with ``torch.export`` (non-strict), falling back per submodule.

What cannot be exported stays eager and is named in the result, so one bad layer never fails the model.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from dsx.core.checks import check_dynamic_shapes, check_flag
from dsx.core.inputs import Inputs, check_module, normalize_inputs, run_model
from dsx.core.transform import eval_mode


@dataclass
class Captured:
    """A captured model: ``module`` runs like the original; ``graphs`` maps qualified names ("" = whole model)
    to the GraphModules inside it; ``eager`` maps the parts left uncaptured to the reason."""

    module: nn.Module
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    eager: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _WithFixedKwargs(nn.Module):
    """Calls ``inner`` with extra fixed keyword arguments (e.g. ``use_cache=False`` for HF decoders)."""

    def __init__(self, inner: nn.Module, fixed: dict[str, Any]):
        super().__init__()
        self.inner = inner
        self.fixed = fixed
        self.train(inner.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs, **self.fixed)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def batch_dynamic_shapes(model: nn.Module, inputs: Inputs) -> dict[str, Any]:
    """torch.export ``dynamic_shapes`` for ``model`` marking dim 0 of every input tensor of size >= 2 as a batch
    dim (``Dim.AUTO``: dynamic where the model allows, specialized where it does not)."""
    args, kwargs = inputs
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def mark(x: Any) -> Any:
        batched = isinstance(x, torch.Tensor) and x.dim() and x.shape[0] >= 2
        return {0: torch.export.Dim.AUTO} if batched else None

    return {name: pytree.tree_map(mark, value) for name, value in bound.items()}


def check_batchable(inputs: Inputs, what: str) -> None:
    """Raise ``ValueError`` unless every input tensor has a batch dim of size >= 2: export specializes sizes 0 and
    1, so a dynamic batch asked for on such inputs would silently come out static."""
    small = [tuple(x.shape) for x in pytree.tree_leaves(inputs)
             if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] < 2)]
    if small:
        raise ValueError(f"example_inputs: {what} needs a batch size >= 2 in every input tensor (export specializes "
                         f"sizes 0 and 1); got shapes {small}")


def export_graph(model: nn.Module, inputs: Inputs, *, dynamic_shapes: Any = None,
                 guards: bool = True) -> fx.GraphModule:
    """``torch.export`` (non-strict) to a plain, picklable GraphModule in eval mode with the same call
    signature; ``guards=False`` drops export's input-shape guards (when the caller guards, as dynamo does).
    ``dynamic_shapes="batch"`` keeps dim 0 of every input dynamic (see ``batch_dynamic_shapes``)."""
    args, kwargs = inputs
    if dynamic_shapes == "batch":
        dynamic_shapes = batch_dynamic_shapes(model, inputs)
    unlifted = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False).module()
    if not guards:
        for node in list(unlifted.graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn":
                unlifted.graph.erase_node(node)
    elif isinstance(getattr(unlifted, "_guards_fn", None), nn.Module):
        shapes = [tuple(x.shape) for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
        unlifted._guards_fn = ShapeGuards(unlifted._guards_fn, str(shapes))
    return fx.GraphModule(unlifted, unlifted.graph).eval()


class ShapeGuards(nn.Module):
    """export's input guards, raising a ``ValueError`` that says which shapes the captured graph serves."""

    def __init__(self, guards: nn.Module, shapes: str) -> None:
        super().__init__()
        self.guards, self.shapes = guards, shapes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.guards(*args, **kwargs)
        except AssertionError as e:
            raise ValueError(f"inputs: this captured graph serves the example inputs' shapes {self.shapes} only "
                             f"({e}); capture with dynamic_batch=True, or use dsx.optimize / dsx.Compile, which "
                             "take any shape") from None


def accepts(model: nn.Module, name: str, *, or_var: bool = False) -> bool:
    """Whether ``model.forward`` takes a parameter called ``name``; ``or_var=True`` also counts ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return or_var
    return name in params or (or_var and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))


def _with(inputs: Inputs, fixed: dict[str, Any]) -> Inputs:
    return inputs[0], {**inputs[1], **fixed}


def _wrap(module: nn.Module, fixed: dict[str, Any]) -> nn.Module:
    return _WithFixedKwargs(module, fixed) if fixed else module


def _export_whole(model: nn.Module, inputs: Inputs, fixed: dict[str, Any], dynamic_shapes: Any,
                  notes: list[str]) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Export the whole model with the fixed kwargs; retry without a KV cache for Hugging Face decoders.
    Returns the graph and the kwargs it was exported with (the caller re-applies them on every call)."""
    try:
        return export_graph(model, _with(inputs, fixed), dynamic_shapes=dynamic_shapes), fixed
    except Exception as first:
        if fixed or not accepts(model, "use_cache") or "use_cache" in inputs[1]:
            raise
        retry = {"use_cache": False}
        try:
            gm = export_graph(model, _with(inputs, retry), dynamic_shapes=dynamic_shapes)
        except Exception:
            raise first from None
        notes.append("exported with use_cache=False (the KV-cache object is not exportable); "
                     "the captured model returns no past_key_values")
        return gm, retry


def _record_calls(model: nn.Module, inputs: Inputs) -> dict[str, list[Inputs]]:
    """Run the model once and record the (args, kwargs) of every submodule call, by qualified name."""
    calls: dict[str, list[Inputs]] = {}
    handles = []
    for name, mod in model.named_modules():
        if name:
            def hook(_m: nn.Module, args: tuple, kwargs: dict, _name: str = name) -> None:
                calls.setdefault(_name, []).append((args, kwargs))
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _capture_parts(root: nn.Module, prefix: str, calls: dict[str, list[Inputs]], out: Captured,
                   dynamic_batch: bool) -> None:
    """Capture each child of ``root`` that was called exactly once; descend into those that fail."""
    for child_name, child in root.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        seen = calls.get(name, [])
        if len(seen) == 1:
            try:
                gm = export_graph(child, seen[0], dynamic_shapes="batch" if dynamic_batch else None)
            except Exception as e:
                has_children = any(True for _ in child.children())
                out.eager[name] = _short(e) + (" (its own forward runs eager, submodules captured where possible)"
                                               if has_children else "")
                if has_children:
                    _capture_parts(child, name, calls, out, dynamic_batch)
                continue
            _set_submodule(out.module, name, gm)
            out.graphs[name] = gm
        elif seen:
            out.eager[name] = f"called {len(seen)} times per forward; kept eager to keep every call shape-correct"
            _capture_parts(child, name, calls, out, dynamic_batch)
        else:
            _capture_parts(child, name, calls, out, dynamic_batch)


def capture(model: nn.Module, example_inputs: Any, *, dynamic_shapes: Any = None, dynamic_batch: bool = False,
            fixed_kwargs: dict[str, Any] | None = None) -> Captured:
    """Capture ``model`` on ``example_inputs`` as ATen fx graphs; the caller's model is not modified.

    The whole model is exported when possible (``Captured.module`` is then a GraphModule sharing the
    model's parameters). Otherwise each submodule is exported on the inputs it received, and the parts
    that still fail stay eager, named with the reason in ``Captured.eager``. ``dynamic_batch=True`` keeps
    dim 0 of the inputs dynamic (``dynamic_shapes`` gives torch.export's full control instead);
    ``fixed_kwargs`` are passed on every call and baked into the capture (e.g. ``{"use_cache": False}``).
    """
    check_module(model)
    check_flag("dynamic_batch", dynamic_batch)
    if fixed_kwargs is not None and not (isinstance(fixed_kwargs, dict)
                                         and all(isinstance(k, str) for k in fixed_kwargs)):
        raise TypeError(f"fixed_kwargs: expected a dict of keyword arguments or None, got {fixed_kwargs!r}")
    for key in fixed_kwargs or {}:
        if not accepts(model, key, or_var=True):
            raise ValueError(f"fixed_kwargs: the model's forward takes no argument {key!r}")
    check_dynamic_shapes(dynamic_shapes)
    return capture_inputs(model, normalize_inputs(example_inputs), dynamic_shapes=dynamic_shapes,
                          dynamic_batch=dynamic_batch, fixed_kwargs=fixed_kwargs)


def capture_inputs(model: nn.Module, inputs: Inputs, *, dynamic_shapes: Any = None, dynamic_batch: bool = False,
                   fixed_kwargs: dict[str, Any] | None = None) -> Captured:
    """``capture`` for inputs already normalized to ``(args, kwargs)``; a training-mode model is captured (and run)
    in eval mode, so its BatchNorm statistics and mode flags are left as they were."""
    with eval_mode(model):
        return _capture_eval(model, inputs, dynamic_shapes, dynamic_batch, fixed_kwargs)


def _capture_eval(model: nn.Module, inputs: Inputs, dynamic_shapes: Any, dynamic_batch: bool,
                  fixed_kwargs: dict[str, Any] | None) -> Captured:
    fixed = dict(fixed_kwargs or {})
    notes = [f"captured with {fixed} fixed"] if fixed else []
    if dynamic_batch and dynamic_shapes is None:
        check_batchable(inputs, "dynamic_batch")
        dynamic_shapes = "batch"
    run_model(model, _with(inputs, fixed))
    try:
        gm, used = _export_whole(model, inputs, fixed, dynamic_shapes, notes)
        return Captured(_wrap(gm, used), {"": gm}, {}, notes)
    except Exception as e:
        notes.append(f"whole-model export failed ({_short(e)}); captured submodules separately")
    out = Captured(copy.deepcopy(model), {}, {"": notes[-1]}, notes)
    _capture_parts(out.module, "", _record_calls(model, _with(inputs, fixed)), out, dynamic_batch)
    out.module = _wrap(out.module, fixed)
    return out
