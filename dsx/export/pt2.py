"""Export a model as a ``.pt2`` file: a serialized ``torch.export`` program (not a pickle), verified by reloading it.

Models optimized by dsx keep their ``torch.ops.dsx.*`` kernels; ``load_pt2`` registers them before loading.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from typing import Any

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


def load_pt2(path: str | os.PathLike) -> nn.Module:
    """Load a ``.pt2`` file written by ``export_pt2`` (or ``torch.export.save``) as a runnable module."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_pt2: {path} not found")
    register_dsx_ops()
    return torch.export.load(path).module()


def export_pt2(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_shapes: Any = None,
               verify: bool = True, rtol: float = 1e-4) -> ExportResult:
    """``torch.export`` ``model`` (non-strict) on ``example_inputs`` and save the program to ``path``.

    ``dynamic_shapes`` is a torch.export spec, or ``"batch"`` to keep dim 0 of every input dynamic. A model in
    training mode is exported in eval mode (a copy). With ``verify=True`` the file is loaded back and run on the
    example inputs; a max relative error over ``rtol`` raises ``VerificationError``.
    """
    check_module(model)
    inputs = normalize_inputs(example_inputs)
    model, dynamic_shapes, notes = prepare(model, inputs, dynamic_shapes)
    program = torch.export.export(model, *inputs, dynamic_shapes=dynamic_shapes, strict=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    if not verify:
        return ExportResult(path, "pt2", notes=notes)
    err = compare_outputs(run_model(model, inputs),
                          run_model(load_pt2(path), inputs, name="example_inputs (reloaded .pt2 program)"))
    check_error("pt2", "the reloaded program's outputs", err, rtol)
    notes.append("verified by reloading the file with torch.export.load")
    return ExportResult(path, "pt2", err["max_abs"], err["max_rel"], notes)
