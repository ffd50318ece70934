"""Save and load transformed models without pickle: safetensors weights plus the JSON history that rebuilt them.

Loading replays the recorded transforms on a fresh instance of the original architecture, then loads the weights.
A save is written beside the target and swapped in by rename (``dsx.core.atomic``), so a crash never loses the last one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_model, save_model

from dsx.core.atomic import commit, fsync_file, previous, recover, start, write_bytes
from dsx.core.inputs import check_module, model_device, synthesize
from dsx.core.report import REPORT_ATTR
from dsx.core.transform import HISTORY_ATTR, ORIGIN_ATTR, Transform, history

FORMAT, VERSION = "dsx", 1
WEIGHTS, META = "model.safetensors", "dsx.json"


def origin(model: nn.Module) -> str:
    """Class path of the architecture ``model`` was built from (before any dsx transform replaced it)."""
    return getattr(model, ORIGIN_ATTR, f"{type(model).__module__}.{type(model).__qualname__}")


def is_save(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``save`` (its ``dsx.json`` says so)."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``path/model.safetensors`` (the state dict) and ``path/dsx.json`` (origin, mode, history), atomically.

    Both files are written and fsynced in a sibling directory that then replaces ``path`` by rename: a crash at any
    point leaves the previous save at ``path`` (or, between the two renames, beside it, where ``load`` finds it).

    Args:
        model: the (transformed) model.
        path: the directory to write; an earlier dsx save there is replaced.
        overwrite: also replace a non-empty directory that is not a dsx save (its contents are deleted).

    Returns:
        ``path``.

    Raises:
        TypeError: ``overwrite`` is not a bool, or ``model`` not an ``nn.Module``.
        ValueError: ``path`` is a file, or a non-empty directory that is not a dsx save while ``overwrite=False``;
            or the model's history is not JSON-able.
    """
    check_module(model)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected True or False, got {overwrite!r}")
    meta = {"format": FORMAT, "version": VERSION, "origin": origin(model), "training": model.training,
            "history": history(model), "report": getattr(model, REPORT_ATTR, None)}
    try:
        text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: the model's dsx history is not JSON-able: {e}") from e
    path = Path(path)
    recover(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: {path} is a file; dsx.save writes a directory")
    if path.is_dir() and any(path.iterdir()) and not is_save(path) and not overwrite:
        raise ValueError(f"path: {path} is a non-empty directory that is not a dsx save; pass overwrite=True to "
                         "replace it (its contents are deleted)")
    tmp = start(path)
    try:
        save_model(model, str(tmp / WEIGHTS), force_contiguous=True)
        fsync_file(tmp / WEIGHTS)
        write_bytes(tmp / META, text.encode())
        return commit(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    if not path.exists() and previous(path).is_dir():  # a save crashed between its two renames
        path = previous(path)
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
