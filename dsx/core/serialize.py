"""Save and load transformed models without pickle: safetensors weights plus the JSON history that rebuilt them.

Loading replays the recorded transforms on a fresh instance of the original architecture, then loads the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_model, save_model

from dsx.core.inputs import check_module, model_device, synthesize
from dsx.core.report import REPORT_ATTR
from dsx.core.transform import HISTORY_ATTR, ORIGIN_ATTR, Transform, history

FORMAT, VERSION = "dsx", 1
WEIGHTS, META = "model.safetensors", "dsx.json"


def origin(model: nn.Module) -> str:
    """Class path of the architecture ``model`` was built from (before any dsx transform replaced it)."""
    return getattr(model, ORIGIN_ATTR, f"{type(model).__module__}.{type(model).__qualname__}")


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``path/model.safetensors`` (the state dict) and ``path/dsx.json`` (origin, mode, history)."""
    check_module(model)
    meta = {"format": FORMAT, "version": VERSION, "origin": origin(model), "training": model.training,
            "history": history(model), "report": getattr(model, REPORT_ATTR, None)}
    try:
        text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: the model's dsx history is not JSON-able: {e}") from e
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / WEIGHTS), force_contiguous=True)
    (path / META).write_text(text)
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    for name in (META, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"load: {path / name} not found (expected a directory written by dsx.save)")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load: {path / META} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"load: {path / META} is not a dsx save (format {FORMAT!r}, version {VERSION})")
    return meta


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by ``save``: replay its transforms on ``model`` and load the weights.

    ``model`` must be a fresh instance of the original architecture (same class, dtype and device); it is
    consumed: the transforms are applied to it in place.
    """
    check_module(model)
    path = Path(path)
    meta = _read_meta(path)
    if origin(model) != meta["origin"]:
        raise ValueError(f"load: {path} holds a {meta['origin']}, but the model given is a {origin(model)}")
    if history(model):
        raise ValueError("load: the model given was already transformed by dsx; pass a fresh instance")
    model.train(meta["training"])
    for entry in meta["history"]:
        step = dataclasses.replace(Transform.from_config(entry["transform"], entry["config"]), verify=False,
                                   inplace=True, replay=True)
        inputs = None
        if entry["inputs"] is not None:
            args, kwargs = synthesize(entry["inputs"], device=model_device(model))
            inputs = kwargs or args
        model = step(model, inputs)
    try:
        load_model(model, str(path / WEIGHTS), strict=True, device=str(model_device(model)))
    except RuntimeError as e:
        raise ValueError(f"load: the weights in {path / WEIGHTS} do not fit the rebuilt model: {e}") from e
    setattr(model, HISTORY_ATTR, list(meta["history"]))
    if meta.get("report") is not None:
        setattr(model, REPORT_ATTR, meta["report"])
    setattr(model, ORIGIN_ATTR, meta["origin"])
    return model
