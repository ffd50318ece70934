"""``dsx.report(result)``: every plan ``dsx.optimize`` tried (latency, speed-up, error, size) and which one won.

Plain JSON-able data, so ``dsx.save`` keeps it; renders as text, as HTML in Jupyter, and as a trade-off plot.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from dsx.core.inputs import check_module
from dsx.core.table import html_table, text_table

REPORT_ATTR = "_dsx_report"
COLUMNS = ("plan", "status", "latency ms", "spread", "speed-up", "error", "size MB", "kept float", "won")
PLOT_HINT = 'pip install matplotlib  (or: pip install "dsx[plot]")'


@dataclass
class PlanRow:
    """One plan tried: its name, what happened, median latency (ms) and relative spread, speed-up over the original
    measured side by side, output error (by the report's metric), size, and layers the budget kept float."""

    plan: str
    status: str
    latency_ms: float | None = None
    spread: float | None = None
    speedup: float | None = None
    error: float | None = None
    size_mb: float | None = None
    kept_float: int = 0
    won: bool = False


@dataclass
class Report:
    """The search's result: ``rows`` (one per plan), the ``metric`` and ``max_error`` it held, ``device``,
    ``workload`` (what was timed) and ``notes``."""

    rows: list[PlanRow]
    metric: str
    max_error: float | None
    device: str
    workload: str
    notes: list[str] = field(default_factory=list)

    @property
    def winner(self) -> PlanRow:
        """The row of the plan returned."""
        return next(r for r in self.rows if r.won)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(**{**data, "rows": [PlanRow(**r) for r in data["rows"]]})

    def _cells(self) -> list[list[Any]]:
        dash = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        return [[r.plan, r.status, dash(r.latency_ms, "{:.2f}"), dash(r.spread, "{:.1%}"), dash(r.speedup, "{:.2f}x"),
                 dash(r.error, "{:.3g}"), dash(r.size_mb, "{:.1f}"), r.kept_float or "-", "*" if r.won else ""]
                for r in self.rows]

    def _header(self) -> str:
        budget = "lossless (max_rel 1e-4)" if self.max_error is None else f"{self.metric} <= {self.max_error:g}"
        return f"dsx.optimize on {self.device}: {budget}; timed: {self.workload}"

    def __str__(self) -> str:
        cells = [[c[:70] + "..." if isinstance(c, str) and len(c) > 73 else c for c in row] for row in self._cells()]
        return "\n".join([self._header(), text_table(COLUMNS, cells), *self.notes])

    def _repr_html_(self) -> str:
        notes = "".join(f"<p>{n}</p>" for n in self.notes)
        return f"<div><p>{self._header()}</p>{html_table(COLUMNS, self._cells())}{notes}</div>"

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw speed-up against error for every measured plan into ``path`` (any matplotlib format).

        Raises:
            ImportError: matplotlib is not installed (with the install command).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(f"Report.plot needs matplotlib, which is not installed: {PLOT_HINT}") from e
        rows = [r for r in self.rows if r.speedup is not None and r.error is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.scatter(max(r.error, 1e-9), r.speedup, color="tab:red" if r.won else "tab:blue")
            ax.annotate(r.plan, (max(r.error, 1e-9), r.speedup), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if self.max_error is not None:
            ax.axvline(self.max_error, color="grey", linestyle="--", label=f"max_error {self.max_error:g}")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel(f"output error ({self.metric})")
        ax.set_ylabel("speed-up over the original")
        ax.set_title(self._header(), fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path


def report(model: nn.Module) -> Report:
    """The plans ``dsx.optimize`` tried to produce ``model``.

    Args:
        model: a result of ``dsx.optimize`` (or its ``dsx.load``).

    Returns:
        The ``Report``: ``print`` it, show it in Jupyter, or ``.plot("tradeoff.png")``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` did not come from ``dsx.optimize``.
    """
    check_module(model)
    data = getattr(model, REPORT_ATTR, None)
    if data is None:
        raise ValueError("model: has no dsx.optimize report (pass the model dsx.optimize returned)")
    return Report.from_dict(data)
