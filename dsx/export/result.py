"""What an export produced: the file, its format, and how closely the exported program matches PyTorch.

Every exporter returns one, so the CLI and callers report the same fields whatever the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
