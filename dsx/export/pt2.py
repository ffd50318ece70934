"""Export a model as a ``.pt2`` file: a serialized ``torch.export`` program (not a pickle), verified by reloading it.

Models optimized by dsx keep their ``torch.ops.dsx.*`` kernels; ``load_pt2`` registers them before loading, and
refuses any archive member that could run code when unpickled (``torch.export.load`` alone falls back to full pickle).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pkgutil
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from dsx.core.inputs import check_module, normalize_inputs, run_model
from dsx.core.transform import compare_outputs
from dsx.export.result import ExportResult, check_error, prepare


def register_dsx_ops() -> None:
    """Import every ``dsx.kernels`` module so the ``torch.ops.dsx.*`` ops a program may call are registered."""
    import dsx.kernels

    for info in pkgutil.iter_modules(dsx.kernels.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"dsx.kernels.{info.name}")


OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")
"""Archive members holding pickled Python objects (torchbind / opaque constants): never loaded."""

COMPILED_DIR = "data/aotinductor/"
"""AOTInductor members: compiled shared libraries, which run code when loaded."""

ZIP_MAGIC = b"PK\x03\x04"


def _pickled_members(archive: zipfile.ZipFile, path: Path) -> Iterator[str]:
    """The members ``torch.export.load`` would unpickle: nested ``torch.save`` archives (sample inputs, legacy
    weights), ``.pt`` files, and every ``path_name`` a payload config marks ``use_pickle``."""
    names = archive.namelist()
    for name in names:
        if name.endswith(".pt") or archive.read(name)[:4] == ZIP_MAGIC:
            yield name
        if name.endswith("_config.json"):
            try:
                entries = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError):
                raise ValueError(f"load_pt2: {path}: the archive member {name} is not valid JSON") from None
            folder = name.rsplit("/", 1)[0]
            for entry in entries.values() if isinstance(entries, dict) else ():
                if isinstance(entry, dict) and entry.get("use_pickle"):
                    yield f"{folder}/{entry.get('path_name')}"


def check_archive(data: bytes, path: Path) -> None:
    """Refuse a ``.pt2`` archive unless every member ``torch.export.load`` unpickles loads with
    ``torch.load(weights_only=True)`` (tensors and plain containers only), and it holds no pickled objects or
    compiled code.

    Raises:
        ValueError: not a zip archive, an archive in the pre-2.8 layout, or a member that needs more than
            weights-only unpickling (a crafted file that would run code).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ValueError(f"load_pt2: {path} is not a .pt2 archive (not a zip file)") from None
    names = archive.namelist()
    if not any(n.rsplit("/", 1)[-1] == "archive_version" for n in names):
        raise ValueError(f"load_pt2: {path} is not in the .pt2 archive layout of torch >= 2.8 (no archive_version); "
                         "re-export it with dsx.export or torch.export.save")
    for name in names:
        inner, base = name.split("/", 1)[-1], name.rsplit("/", 1)[-1]
        if inner.startswith(COMPILED_DIR):
            raise ValueError(f"load_pt2: {path} holds compiled AOTInductor code ({name}); dsx loads only programs")
        if base.startswith(OBJECT_PREFIXES):
            raise ValueError(f"load_pt2: {path} holds a pickled Python object ({name}); dsx never unpickles those")
    for name in _pickled_members(archive, path):
        if name not in names:
            raise ValueError(f"load_pt2: {path} names a pickled member {name} that the archive does not hold")
        try:
            torch.load(io.BytesIO(archive.read(name)), weights_only=True, map_location="cpu")
        except Exception as e:
            raise ValueError(f"load_pt2: {path} refused: its member {name} needs more than weights-only unpickling "
                             f"({type(e).__name__}); a .pt2 from dsx.export never does, so it was not loaded") from None


def load_pt2(path: str | os.PathLike) -> nn.Module:
    """Load a ``.pt2`` file written by ``export_pt2`` (or ``torch.export.save``) as a runnable module.

    The file is read once; every member that would be unpickled must pass ``torch.load(weights_only=True)``
    first (see ``check_archive``), so a crafted archive is refused before anything in it runs.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the archive is refused (see ``check_archive``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_pt2: {path} not found")
    data = path.read_bytes()
    check_archive(data, path)
    register_dsx_ops()
    return torch.export.load(io.BytesIO(data)).module()


def export_pt2(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_shapes: Any = None,
               verify: bool = True, rtol: float = 1e-4) -> ExportResult:
    """``torch.export`` ``model`` (non-strict) on ``example_inputs`` and save the program to ``path``.

    ``dynamic_shapes`` is a torch.export spec, or ``"batch"`` to keep dim 0 of every input dynamic. A model in
    training mode is exported in eval mode (a copy). With ``verify=True`` the file is loaded back and run on the
    example inputs; a max relative error over ``rtol`` raises ``VerificationError``.
    """
    check_module(model)
    inputs = normalize_inputs(example_inputs)
    model, inputs, dynamic_shapes, notes, expected = prepare(model, inputs, dynamic_shapes)
    program = torch.export.export(model, *inputs, dynamic_shapes=dynamic_shapes, strict=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    if not verify:
        return ExportResult(path, "pt2", notes=notes)
    err = compare_outputs(expected, run_model(load_pt2(path), inputs, name="example_inputs (reloaded .pt2 program)"))
    check_error("pt2", "the reloaded program's outputs", err, rtol)
    notes.append("verified by reloading the file with torch.export.load")
    return ExportResult(path, "pt2", err["max_abs"], err["max_rel"], notes)
