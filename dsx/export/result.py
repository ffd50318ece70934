"""What an export produced: the file, its format, and how closely the exported program matches PyTorch.

Every exporter returns one, so the CLI and callers report the same fields whatever the format.
"""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from dsx.compress.masks import make_permanent, masked_modules
from dsx.core.checks import check_dynamic_shapes
from dsx.core.inputs import Inputs, check_finite_parameters, run_model
from dsx.core.transform import VerificationError
from dsx.graph.capture import batch_dynamic_shapes, check_batchable


@dataclass
class ExportResult:
    """``path`` written in ``format``; ``max_abs`` / ``max_rel`` are the verified errors vs PyTorch (None when
    not verified); ``notes`` say anything the caller should know (e.g. which runtime verified it)."""

    path: Path
    format: str
    max_abs: float | None = None
    max_rel: float | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        err = "not verified" if self.max_rel is None else f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}"
        return f"{self.format} -> {self.path} ({err})"


def cache_argument(model: nn.Module) -> str | None:
    """The name of the KV-cache argument of a Hugging Face decoder's ``forward`` (``cache`` in recent
    transformers, ``past_key_values`` before), None for a model that takes no cache."""
    params = inspect.signature(model.forward).parameters
    if "use_cache" not in params:
        return None
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def returns_cache(output: Any) -> bool:
    """Whether a model output holds a Hugging Face ``Cache`` object (a decoder run with ``use_cache``)."""
    cache = getattr(sys.modules.get("transformers"), "Cache", None)
    return cache is not None and any(isinstance(x, cache) for x in pytree.tree_leaves(output))


def without_cache(model: nn.Module, inputs: Inputs) -> tuple[Inputs, list[str]]:
    """``inputs`` with ``use_cache=False`` added, for a model that returns its KV cache (a ``DynamicCache``
    object, which no exporter can write), and the note saying so.

    Raises:
        ValueError: the inputs ask for ``use_cache=True`` (export the cache with ``kv_cache=True`` instead), or
            the model's forward takes no ``use_cache`` to turn the cache off.
    """
    args, kwargs = inputs
    if kwargs.get("use_cache") is not None:
        raise ValueError("example_inputs: use_cache=True returns a cache object that cannot be exported as given; "
                         "pass kv_cache=True to export past key/value inputs and present outputs")
    if cache_argument(model) is None:
        raise ValueError(f"model: {type(model).__name__} returns a cache object and its forward takes no use_cache "
                         "argument to turn it off; wrap it to return tensors only")
    return (args, {**kwargs, "use_cache": False}), ["exported without its KV cache (use_cache=False)"]


def prepare(model: nn.Module, inputs: Inputs, dynamic_shapes: Any) -> tuple[nn.Module, Inputs, Any, list[str], Any]:
    """The model to trace (an eval-mode copy if it is training; a copy with pruning / 2:4 masks folded into plain
    weights, so the file holds dense weights with zeros), the inputs to trace it on (``use_cache=False`` added
    for a decoder, see ``without_cache``), the resolved ``dynamic_shapes`` (``"batch"`` makes dim 0 of every
    input dynamic), the notes so far, and that model's outputs on those inputs (the file is verified against
    them; running it first turns a model that raises on its inputs into a clear error, not the exporter's)."""
    check_finite_parameters(model)  # before anything is written: NaN weights verify against nothing
    check_dynamic_shapes(dynamic_shapes)
    notes = []
    copied = model.training
    if copied:
        model = copy.deepcopy(model).eval()
        notes.append("exported in eval mode")
    if masked_modules(model):
        model = make_permanent(model, inplace=copied)  # one private copy at most
        notes.append("pruning masks folded into the weights")
    expected = run_model(model, inputs)
    if returns_cache(expected):
        inputs, more = without_cache(model, inputs)
        notes += more
        expected = run_model(model, inputs)
        if isinstance(dynamic_shapes, dict):
            dynamic_shapes = {"use_cache": None, **dynamic_shapes}
    if dynamic_shapes == "batch":
        check_batchable(inputs, "dynamic_shapes='batch'")
        dynamic_shapes = batch_dynamic_shapes(model, inputs)
    return model, inputs, dynamic_shapes, notes, expected


def unpadded(inputs: Inputs, tensors: list[Any]) -> list[Any]:
    """``tensors`` with the positions an ``attention_mask`` input pads set to 0 in every ``[batch, seq, ...]``
    output: what a model computes there is undefined (a fully masked causal row), and runtimes disagree on it."""
    mask = inputs[1].get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return tensors
    pad = mask == 0
    return [t.masked_fill(pad.view(*pad.shape, *[1] * (t.dim() - 2)), 0)
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == pad.shape else t for t in tensors]


def check_error(format: str, subject: str, err: dict[str, float], rtol: float) -> None:
    """Raise ``VerificationError`` when ``subject`` (what ran the file) drifted past ``rtol`` from the model."""
    if err["max_rel"] > rtol:
        raise VerificationError(f"{format} export: {subject} differ from the model by max relative error "
                                f"{err['max_rel']:.3g} (max abs {err['max_abs']:.3g}), over rtol {rtol:g}")
