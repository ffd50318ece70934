"""Argument checks shared by every public entry point: flags, paths and module-name lists.

Each raises a ``TypeError`` / ``ValueError`` whose message starts with the argument's name, as the rest of dsx does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool.

    Raises:
        TypeError: anything else (a truthy string such as ``"no"`` must not switch a flag on).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """``value`` as a positive int (``None`` too with ``optional``).

    Raises:
        ValueError: a bool, another type, or an int under 1.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if optional else ''}, got {value!r}")
    return value


def check_positive_number(name: str, value: Any) -> float:
    """``value`` as a float above 0.

    Raises:
        ValueError: a bool, another type, or a number that is not above 0 (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def check_path(name: str, value: Any, *, directory: bool | None = None) -> Path:
    """``value`` as a ``Path``; ``directory=True`` / ``False`` also refuses an existing file / directory there, and a
    parent that is a file.

    Raises:
        TypeError: not a str or ``os.PathLike``.
        ValueError: the path (or its parent) exists as the wrong kind.
    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path (str or os.PathLike), got {value!r}")
    path = Path(value)
    if directory is None:
        return path
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name}: {parent} is a file, not a directory")
            break
    if directory and path.is_file():
        raise ValueError(f"{name}: {path} is a file; a directory is written there")
    if not directory and path.is_dir():
        raise ValueError(f"{name}: {path} is a directory; a file is written there")
    return path


def matches(name: str, pattern: str) -> bool:
    """``pattern`` names ``name`` or one of its parents, or is ``"re:<regex>"`` fully matching one of them
    (so, as a plain name does, a pattern that picks a block picks everything inside it)."""
    parts = name.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
    if pattern.startswith("re:"):
        return any(re.fullmatch(pattern[3:], n) for n in names)
    return pattern in names


def check_names(name: str, value: Any, *, patterns: bool = True) -> list[str]:
    """A list of module names (and, with ``patterns``, ``"re:<regex>"`` patterns, compiled here to check them).

    Raises:
        TypeError: a bare string (not a list of characters), another type, or an item that is not a string.
        ValueError: an invalid regular expression.
    """
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        hint = "; wrap it in a list" if isinstance(value, str) else ""
        what = "names or 're:' patterns" if patterns else "module names"
        raise TypeError(f"{name}: expected a list of {what}, got {value!r}{hint}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{name}: expected module names (str), got {item!r} ({type(item).__name__})")
        if patterns and item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                raise ValueError(f"{name}: {item!r} is not a valid regular expression: {e}") from None
    return list(value)


def check_dynamic_shapes(value: Any) -> None:
    """Refuse a ``dynamic_shapes`` that is neither None, ``"batch"`` nor a torch.export spec (dict / tuple / list).

    Raises:
        TypeError: any other value.
    """
    if value is not None and value != "batch" and not isinstance(value, (dict, tuple, list)):
        raise TypeError(f"dynamic_shapes: expected a torch.export spec (dict / tuple / list), 'batch' or None, "
                        f"got {value!r}")
