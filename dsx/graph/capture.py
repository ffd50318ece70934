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

from dsx.core.inputs import Inputs, check_module, normalize_inputs, run_model


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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs, **self.fixed)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def export_graph(model: nn.Module, inputs: Inputs, *, dynamic_shapes: Any = None,
                 guards: bool = True) -> fx.GraphModule:
    """``torch.export`` (non-strict) to a plain, picklable GraphModule in eval mode with the same call
    signature; ``guards=False`` drops export's input-shape guards (when the caller guards, as dynamo does)."""
    args, kwargs = inputs
    unlifted = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False).module()
    if not guards:
        for node in list(unlifted.graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn":
                unlifted.graph.erase_node(node)
    return fx.GraphModule(unlifted, unlifted.graph).eval()


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a parameter called ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _export_whole(model: nn.Module, inputs: Inputs, dynamic_shapes: Any, notes: list[str]) -> fx.GraphModule:
    """Export the whole model; retry without a KV cache output for Hugging Face decoders."""
    try:
        return export_graph(model, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as first:
        args, kwargs = inputs
        if not accepts(model, "use_cache") or "use_cache" in kwargs:
            raise
        try:
            gm = export_graph(_WithFixedKwargs(model, {"use_cache": False}), inputs, dynamic_shapes=dynamic_shapes)
        except Exception:
            raise first from None
        notes.append("exported with use_cache=False (the KV-cache object is not exportable); "
                     "the captured model returns no past_key_values")
        return gm


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


def _capture_parts(root: nn.Module, prefix: str, calls: dict[str, list[Inputs]], out: Captured) -> None:
    """Capture each child of ``root`` that was called exactly once; descend into those that fail."""
    for child_name, child in root.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        seen = calls.get(name, [])
        if len(seen) == 1:
            try:
                gm = export_graph(child, seen[0])
            except Exception as e:
                has_children = any(True for _ in child.children())
                out.eager[name] = _short(e) + (" (its own forward runs eager, submodules captured where possible)"
                                               if has_children else "")
                if has_children:
                    _capture_parts(child, name, calls, out)
                continue
            _set_submodule(out.module, name, gm)
            out.graphs[name] = gm
        elif seen:
            out.eager[name] = f"called {len(seen)} times per forward; kept eager to keep every call shape-correct"
            _capture_parts(child, name, calls, out)
        else:
            _capture_parts(child, name, calls, out)


def capture(model: nn.Module, example_inputs: Any, *, dynamic_shapes: Any = None,
            fixed_kwargs: dict[str, Any] | None = None) -> Captured:
    """Capture ``model`` on ``example_inputs`` as ATen fx graphs; the caller's model is not modified.

    The whole model is exported when possible (``Captured.module`` is then a GraphModule sharing the
    model's parameters). Otherwise each submodule is exported on the inputs it received, and the parts
    that still fail stay eager, named with the reason in ``Captured.eager``. ``fixed_kwargs`` are passed
    on every call and baked into the capture (e.g. ``{"use_cache": False}``).
    """
    check_module(model)
    return capture_inputs(model, normalize_inputs(example_inputs), dynamic_shapes=dynamic_shapes,
                          fixed_kwargs=fixed_kwargs)


def capture_inputs(model: nn.Module, inputs: Inputs, *, dynamic_shapes: Any = None,
                   fixed_kwargs: dict[str, Any] | None = None) -> Captured:
    """``capture`` for inputs already normalized to ``(args, kwargs)``."""
    notes: list[str] = []
    if fixed_kwargs:
        model = _WithFixedKwargs(model, dict(fixed_kwargs))
        notes.append(f"captured with {fixed_kwargs} fixed")
    run_model(model, inputs)
    try:
        gm = _export_whole(model, inputs, dynamic_shapes, notes)
        return Captured(gm, {"": gm}, {}, notes)
    except Exception as e:
        notes.append(f"whole-model export failed ({_short(e)}); captured submodules separately")
    out = Captured(copy.deepcopy(model), {}, {"": notes[-1]}, notes)
    _capture_parts(out.module, "", _record_calls(model, inputs), out)
    return out
