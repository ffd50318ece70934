"""The declared pass pipeline (phases of dsx graph passes, in run order) and the runner that applies them.

A pass is a function ``fn(gm) -> int`` that rewrites the ATen-level graph in place (the IR that
``torch.export`` produces) and returns how many rewrites it made; the runner recompiles and lints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch.fx as fx

from dsx.graph.fx_utils import finish
from dsx.graph.passes import (
    add_layer_norm, add_rms_norm, attention, bias_act, fold_batch_norm, gated_mlp, remove_dropout, softmax,
)


@dataclass(frozen=True)
class GraphPass:
    """One rewrite: a name, the function that applies it, and whether it emits a dsx kernel op."""

    name: str
    fn: Callable[[fx.GraphModule], int]
    kernel: bool = False

    @property
    def doc(self) -> str:
        """The first line of the pass function's docstring."""
        return ((self.fn.__doc__ or "").strip().splitlines() or [""])[0]

    def __call__(self, gm: fx.GraphModule) -> int:
        return self.fn(gm)


STRUCTURAL = (
    GraphPass("remove_dropout", remove_dropout.remove_dropout),
    GraphPass("fold_batch_norm", fold_batch_norm.fold_batch_norm),
    GraphPass("attention_to_sdpa", attention.attention_to_sdpa),
)
"""Phase 1, rewrites into plain ATen ops (every device): dropout removal, BatchNorm folding, attention to SDPA."""

KERNELS = (
    GraphPass("add_layer_norm", add_layer_norm.add_layer_norm, kernel=True),
    GraphPass("add_rms_norm", add_rms_norm.add_rms_norm, kernel=True),
    GraphPass("rms_norm", add_rms_norm.rms_norm, kernel=True),
    GraphPass("gated_mlp", gated_mlp.gated_mlp, kernel=True),
    GraphPass("bias_act", bias_act.bias_act, kernel=True),
    GraphPass("scaled_masked_softmax", softmax.scaled_masked_softmax, kernel=True),
)
"""Phase 2, fusions into dsx kernel ops: residual norms before lone norms, gated products before bias + act."""

PASSES: tuple[GraphPass, ...] = (*STRUCTURAL, *KERNELS)
"""Every pass, in run order."""


def available_passes() -> dict[str, GraphPass]:
    """All passes by name, in run order."""
    return {p.name: p for p in PASSES}


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
            finish(gm)
    return counts
