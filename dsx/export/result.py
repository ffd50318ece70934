"""What an export produced: the file, its format, and how closely the exported program matches PyTorch.

Every exporter returns one, so the CLI and callers report the same fields whatever the format.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

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


def prepare(model: nn.Module, inputs: Inputs, dynamic_shapes: Any) -> tuple[nn.Module, Any, list[str], Any]:
    """The model to trace (an eval-mode copy if it is training; a copy with pruning / 2:4 masks folded into plain
    weights, so the file holds dense weights with zeros), the resolved ``dynamic_shapes`` (``"batch"`` makes dim 0
    of every input dynamic), the notes so far, and that model's outputs on ``inputs`` (the file is verified
    against them; running it first turns a model that raises on its inputs into a clear error, not the
    exporter's)."""
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
    if dynamic_shapes == "batch":
        check_batchable(inputs, "dynamic_shapes='batch'")
        dynamic_shapes = batch_dynamic_shapes(model, inputs)
    return model, dynamic_shapes, notes, run_model(model, inputs)


def check_error(format: str, subject: str, err: dict[str, float], rtol: float) -> None:
    """Raise ``VerificationError`` when ``subject`` (what ran the file) drifted past ``rtol`` from the model."""
    if err["max_rel"] > rtol:
        raise VerificationError(f"{format} export: {subject} differ from the model by max relative error "
                                f"{err['max_rel']:.3g} (max abs {err['max_abs']:.3g}), over rtol {rtol:g}")
