"""Ordered registry of dsx graph passes and the runner that applies them and counts rewrites.

A pass is a function ``fn(gm) -> int`` that rewrites the ATen-level graph in place (the IR that
``torch.export`` produces) and returns how many rewrites it made; the runner recompiles and lints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch.fx as fx


@dataclass(frozen=True)
class GraphPass:
    """One rewrite: a name, the function that applies it, and whether it emits a dsx kernel op."""

    name: str
    fn: Callable[[fx.GraphModule], int]
    kernel: bool = False
    doc: str = ""

    def __call__(self, gm: fx.GraphModule) -> int:
        return self.fn(gm)


_REGISTRY: dict[str, GraphPass] = {}


PassFn = Callable[[fx.GraphModule], int]


def register(name: str, *, kernel: bool = False) -> Callable[[PassFn], PassFn]:
    """Decorator adding a pass function to the registry under ``name`` (registration order = run order)."""

    def deco(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"a graph pass named {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = GraphPass(name, fn, kernel, doc[0] if doc else "")
        return fn

    return deco


def available_passes() -> dict[str, GraphPass]:
    """All registered passes, in run order."""
    from dsx.graph import passes  # noqa: F401  (registers the built-in passes)

    return dict(_REGISTRY)


def resolve(passes: str | Iterable[str] | None = None, *, device: str = "cuda") -> list[GraphPass]:
    """Turn ``None`` / ``"all"`` / a list of names into GraphPass objects, in registry order.

    ``None`` is the default set for ``device``: every pass on CUDA; on CPU only the graph passes, because a
    kernel op there runs its ATen path (the ops eager runs, plus a custom-op dispatch) and inductor fuses those
    patterns itself. ``"all"`` is every pass. Unknown names raise ``ValueError`` listing the valid ones.
    """
    known = available_passes()
    if passes is None:
        return [p for p in known.values() if not (p.kernel and device == "cpu")]
    if passes == "all":
        return list(known.values())
    if isinstance(passes, str):
        passes = [passes]
    names = list(passes)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"passes: expected pass names (str), got {type(n).__name__}")
        if n not in known:
            raise ValueError(f"passes: unknown pass {n!r}; valid passes are {sorted(known)}")
    return [p for p in known.values() if p.name in names]


def check_passes(passes: Any) -> list[str] | str | None:
    """Validate a ``passes`` argument (None, ``"all"``, a name or a list of names); return it as stored.

    Raises:
        TypeError: not a string, a list of strings or None.
        ValueError: an unknown pass name.
    """
    if passes is not None and not isinstance(passes, str):
        if not isinstance(passes, (list, tuple)):
            raise TypeError(f"passes: expected None, 'all', a pass name or a list of names, got {passes!r}")
        passes = list(passes)
    resolve(passes)
    return passes


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass]) -> dict[str, int]:
    """Apply ``passes`` in order to ``gm`` (in place); return the rewrite count of each pass."""
    counts: dict[str, int] = {}
    for p in passes:
        n = int(p(gm))
        counts[p.name] = n
        if n:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
    return counts
