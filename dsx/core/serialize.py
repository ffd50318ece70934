"""Save and load transformed models without pickle: safetensors weights plus the JSON history that rebuilt them.

Loading replays the recorded transforms on a fresh instance of the original architecture, then loads the weights.
A save is written beside the target and swapped in by rename (``dsx.core.atomic``), so a crash never loses the last one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from dsx.core.checks import check_path
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
    """Write ``path/model.safetensors`` (the state dict) and ``path/dsx.json`` (origin, mode, history), atomically;
    for a Hugging Face model also its ``config.json`` (and ``generation_config.json``), as ``save_pretrained`` does.

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

    Example:
        >>> dsx.save(dsx.quantize(model, "int8"), "out/model-int8")
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
    path = check_path("path", path, directory=True)
    recover(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: {path} is a file; dsx.save writes a directory")
    if path.is_dir() and any(path.iterdir()) and not is_save(path) and not overwrite:
        raise ValueError(f"path: {path} is a non-empty directory that is not a dsx save; pass overwrite=True to "
                         "replace it (its contents are deleted)")
    tmp = start(path)
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"}, force_contiguous=True)
        fsync_file(tmp / WEIGHTS)
        for name, config in hf_configs(model).items():
            write_bytes(tmp / name, config.encode())
        write_bytes(tmp / META, text.encode())
        return commit(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_configs(model: nn.Module) -> dict[str, str]:
    """A Hugging Face model's ``config.json`` (naming its original class in ``architectures``, as
    ``save_pretrained`` does) and ``generation_config.json`` texts by file name; none for other models. With them
    a save is also a folder ``from_pretrained`` reads (see ``dsx.from_pretrained``)."""
    found = {"config.json": getattr(model, "config", None),
             "generation_config.json": getattr(model, "generation_config", None)}
    texts = {name: c.to_json_string() for name, c in found.items() if callable(getattr(c, "to_json_string", None))}
    if "config.json" in texts:
        config = json.loads(texts["config.json"])
        config["architectures"] = [origin(model).rsplit(".", 1)[-1]]
        texts["config.json"] = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return texts


def read_tagged_json(file: Path, *, caller: str, tag: tuple[str, int], what: str) -> dict[str, Any]:
    """The JSON object in ``file`` whose ``"format"`` and ``"version"`` are ``tag`` (dsx saves and checkpoints).

    Args:
        file: the JSON file.
        caller: the public function named in errors.
        tag: the expected ``(format, version)``.
        what: what such a file is, for the error message.

    Raises:
        ValueError: ``file`` is unreadable, not JSON, or not tagged ``tag``.
    """
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{caller}: {file} is unreadable or not valid JSON: {e}") from e
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != tag:
        raise ValueError(f"{caller}: {file} is not {what} (format {tag[0]!r}, version {tag[1]})")
    return meta


def read_meta(path: Path) -> dict[str, Any]:
    """The checked ``dsx.json`` of the save at ``path``.

    Raises:
        FileNotFoundError: ``path`` lacks ``dsx.json`` or ``model.safetensors``.
        ValueError: the metadata is not valid JSON or not a dsx save's.
    """
    for name in (META, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"load: {path / name} not found (expected a directory written by dsx.save)")
    meta = read_tagged_json(path / META, caller="load", tag=(FORMAT, VERSION), what="a dsx save")
    expected = {"origin": str, "training": bool, "history": list}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"load: {path / META}: {key!r} is missing or not a {kind.__name__}")
    for i, entry in enumerate(meta["history"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("transform"), str)
                and isinstance(entry.get("config"), dict) and isinstance(entry.get("inputs"), (dict, type(None)))):
            raise ValueError(f"load: {path / META}: history entry {i} needs 'transform' (a name), 'config' (an "
                             "object) and 'inputs' (an object or null)")
    return meta


def saved_dtypes(path: Path) -> dict[str, str]:
    """The safetensors dtype (``"F32"``, ...) of every tensor in a safetensors file, read from its header.

    Raises:
        ValueError: the file is corrupt or truncated.
    """
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"load: {path} is corrupt or truncated ({e}); it cannot be read as safetensors") from None


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _check_dtypes(model: nn.Module, saved: dict[str, str], path: Path, dtype: torch.dtype | None) -> None:
    """Refuse saved floating tensors (``saved``: their safetensors dtypes) whose dtype differs from the rebuilt
    model's, unless ``dtype`` names the model's dtype (then they are converted)."""
    for name, t in model.state_dict().items():
        got = DTYPES.get(saved.get(name, ""))
        if got is None or not t.is_floating_point() or got == t.dtype or t.dtype == dtype:
            continue
        raise ValueError(f"load: {path} holds {name} as {got}, the rebuilt model has {t.dtype}; build the model in "
                         f"{got}, or pass dtype={t.dtype} to convert the saved tensors")


def _replay(model: nn.Module, meta: dict[str, Any], where: Path) -> nn.Module:
    for i, entry in enumerate(meta["history"]):
        try:
            step = dataclasses.replace(Transform.from_config(entry["transform"], entry["config"]), verify=False,
                                       inplace=True, replay=True)
            inputs = None
            if entry["inputs"] is not None:
                args, kwargs = synthesize(entry["inputs"], device=model_device(model))
                inputs = kwargs or args
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ValueError(f"load: {where}: history entry {i} ({entry['transform']}) cannot be replayed: "
                             f"{type(e).__name__}: {e}") from None
        model = step(model, inputs)
    return model


def load(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by ``save``: replay its transforms on a copy of ``model`` and load the weights.

    Args:
        model: a fresh instance of the original architecture (same class, dtype and device); it is left unchanged,
            also when loading fails.
        path: the directory ``save`` wrote.
        dtype: the model's floating dtype when it differs from the saved one: the saved tensors are converted to
            it (without ``dtype`` such a mismatch is an error, so no precision is lost silently).

    Returns:
        The rebuilt model.

    Raises:
        FileNotFoundError: no save at ``path``.
        ValueError: a corrupt save, another architecture, a transformed ``model``, or weights that do not fit.

    Example:
        >>> restored = dsx.load(MyModel(), "out/model-int8")
    """
    check_module(model)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    path = check_path("path", path)
    if not path.exists() and previous(path).is_dir():  # a save crashed between its two renames
        path = previous(path)
    meta = read_meta(path)
    if origin(model) != meta["origin"]:
        raise ValueError(f"load: {path} holds a {meta['origin']}, but the model given is a {origin(model)}")
    if history(model):
        raise ValueError("load: the model given was already transformed by dsx; pass a fresh instance")
    saved = saved_dtypes(path / WEIGHTS)  # a corrupt file is refused before anything is replayed
    model = copy.deepcopy(model).train(meta["training"])
    model = _replay(model, meta, path / META)
    _check_dtypes(model, saved, path / WEIGHTS, dtype)
    try:
        load_model(model, str(path / WEIGHTS), strict=True, device=str(model_device(model)))
    except (RuntimeError, SafetensorError) as e:
        raise ValueError(f"load: the weights in {path / WEIGHTS} do not fit the rebuilt model: {e}") from e
    setattr(model, HISTORY_ATTR, list(meta["history"]))
    if meta.get("report") is not None:
        setattr(model, REPORT_ATTR, meta["report"])
    setattr(model, ORIGIN_ATTR, meta["origin"])
    return model
