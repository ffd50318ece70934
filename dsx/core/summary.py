"""``dsx.summary(model)``: what dsx did to a model (steps, measured errors, what fired) and what it now weighs.

Renders as an aligned text table in a terminal, an HTML table in Jupyter, and a JSON-able dict for tools.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from dsx.core.inputs import check_module
from dsx.core.report import REPORT_ATTR, Report
from dsx.core.serialize import origin
from dsx.core.table import html_table, text_table
from dsx.core.transform import history

COLUMNS = ("#", "transform", "stage", "config", "max rel err", "tolerance", "info")


@dataclass
class Summary:
    """Rows of applied transforms plus totals: parameter and buffer elements, bytes, bytes per dtype; and the plans
    ``dsx.optimize`` tried (``report``, the ``Report.to_dict()`` form) when it made the model."""

    origin: str
    rows: list[dict[str, Any]]
    parameters: int
    buffers: int
    bytes: int
    dtypes: dict[str, int]
    report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _cells(self) -> list[list[Any]]:
        return history_cells(self.rows)

    def _totals(self) -> list[tuple[str, str]]:
        mix = ", ".join(f"{k} {size_text(v)} ({100 * v / max(self.bytes, 1):.1f}%)" for k, v in self.dtypes.items())
        return [("model", self.origin), ("parameters", f"{self.parameters:,}"),
                ("buffer elements", f"{self.buffers:,}"), ("size", size_text(self.bytes)), ("dtypes", mix or "-")]

    def __str__(self) -> str:
        totals = self._totals()
        width = max(len(k) for k, _ in totals) + 2
        lines = [f"{k + ':':<{width}}{v}" for k, v in totals]
        plans = ["", str(Report.from_dict(self.report))] if self.report else []
        if not self.rows:
            return "\n".join([*lines, "no dsx transforms applied", *plans])
        clipped = [[_clip(c) if isinstance(c, str) else c for c in row] for row in self._cells()]
        return "\n".join([*lines, "", text_table(COLUMNS, clipped), *plans])

    def _repr_html_(self) -> str:
        totals = html_table([k for k, _ in self._totals()], [[v for _, v in self._totals()]])
        body = html_table(COLUMNS, self._cells()) if self.rows else "<p>no dsx transforms applied</p>"
        plans = Report.from_dict(self.report)._repr_html_() if self.report else ""
        return f"<div>{totals}{body}{plans}</div>"


def history_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One history entry (as ``dsx.history`` or a save's ``dsx.json`` holds it) as a summary row."""
    err = entry.get("error") or {}
    return {"transform": entry["transform"], "stage": entry["stage"], "config": entry["config"],
            "max_rel": err.get("max_rel"), "tolerance": err.get("tolerance"), "info": entry["info"]}


def history_cells(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The table cells (under ``COLUMNS``) of summary rows, numbered from 1."""
    return [[i, r["transform"], r["stage"], _pairs(r["config"]) or "-", _dash(r["max_rel"]), _dash(r["tolerance"]),
             _pairs(r["info"], drop_empty=True) or "-"] for i, r in enumerate(rows, 1)]


def _dash(x: float | None) -> float | str:
    return "-" if x is None else x


def size_text(n: float) -> str:
    """``n`` bytes in B / KiB / MiB / GiB / TiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def _clip(s: str, width: int = 60) -> str:
    return s if len(s) <= width else s[: width - 3] + "..."


def _empty(v: Any) -> bool:
    return v is None or (not isinstance(v, bool) and v in ("", 0, [], {}))


def _pairs(d: dict[str, Any], drop_empty: bool = False) -> str:
    """Compact one-line form of a config / info dict: ``k=v, k={k=v}, k=[a, b]``."""
    return ", ".join(f"{k}={_text(v, drop_empty)}" for k, v in d.items() if not (drop_empty and _empty(v)))


def _text(value: Any, drop_empty: bool) -> str:
    if isinstance(value, dict):
        return "{" + _pairs(value, drop_empty) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v, drop_empty) for v in value) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identifies the memory behind ``t`` so tied / shared tensors count once (meta and subclass tensors by id)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = 0
    return (t.device, ptr) if ptr else ("object", id(t))


def summary(model: nn.Module) -> Summary:
    """What dsx transforms were applied to ``model`` (oldest first) and its parameter / memory totals."""
    check_module(model)
    rows = [history_row(entry) for entry in history(model)]
    seen: set[tuple[Any, ...]] = set()
    counts = {"parameters": 0, "buffers": 0}
    dtypes: dict[str, int] = {}
    for kind, tensors in (("parameters", model.parameters()), ("buffers", model.buffers())):
        for t in tensors:
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            counts[kind] += t.numel()
            dtype = str(t.dtype).removeprefix("torch.")
            dtypes[dtype] = dtypes.get(dtype, 0) + t.numel() * t.element_size()
    dtypes = dict(sorted(dtypes.items(), key=lambda kv: -kv[1]))
    return Summary(origin(model), rows, counts["parameters"], counts["buffers"], sum(dtypes.values()), dtypes,
                   getattr(model, REPORT_ATTR, None))
