"""The ``torch.compile(model, backend="dsx")`` backend: dsx passes on the ATen graph, then inductor.

Dynamo's graph is lowered with ``torch.export`` (non-strict) to the same ATen IR ``dsx.optimize`` rewrites, the
dsx passes run there, and inductor compiles the result; AOT autograd traces the registered backward of fused ops.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from dsx.graph.capture import export_graph
from dsx.graph.pass_manager import check_passes, resolve, run_passes

log = logging.getLogger("dsx")
REPORTS_KEPT = 256


def _graph_device(example_inputs: Sequence[Any]) -> str:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"


def _symbolic(x: Any) -> bool:
    return isinstance(x, torch.SymInt) and not isinstance(x.node.maybe_as_int(), int)


def dynamic_spec(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[Any], list[Any] | None]:
    """Concrete inputs for re-tracing a dynamo graph (a symbolic int becomes its hint) and the ``torch.export``
    ``dynamic_shapes`` that keeps symbolic what dynamo made symbolic (``Dim.AUTO``: export infers how the sizes
    relate); the spec is None for a static graph."""
    values = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
    concrete, spec, dynamic = [], [], False
    for x, value in zip(example_inputs, values):
        if isinstance(x, torch.SymInt):
            concrete.append(int(x.node.hint))  # the value dynamo saw; SymNode.hint exists in torch 2.11 - 2.13
            spec.append(torch.export.Dim.AUTO if _symbolic(x) else None)
            dynamic |= _symbolic(x)
            continue
        concrete.append(x)
        dims = {i: torch.export.Dim.AUTO for i, d in enumerate(getattr(value, "shape", ())) if _symbolic(d)}
        spec.append(dims or None)
        dynamic |= bool(dims)
    return concrete, (spec if dynamic else None)


def lower_to_aten(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Re-trace a dynamo graph to ATen with ``torch.export`` (non-strict), keeping dynamo's symbolic sizes
    symbolic; input signature unchanged."""
    concrete, spec = dynamic_spec(gm, example_inputs)
    shapes = None if spec is None else (tuple(spec),)
    with torch._guards.tracing(None):  # export's own shapes must not add guards to dynamo's frame
        return export_graph(gm, (tuple(concrete), {}), dynamic_shapes=shapes, guards=False).train(gm.training)


@dataclass(eq=False)
class DsxBackend:
    """A dynamo backend running dsx passes (``passes=None``: the default set for the graph's device).

    ``reports`` keeps, for the last ``REPORTS_KEPT`` compiled graphs, the rewrite counts of each pass (or why the
    graph was skipped).
    """

    passes: list[str] | str | None = None
    inductor_config: dict[str, Any] = field(default_factory=dict)
    reports: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=REPORTS_KEPT))

    def __post_init__(self) -> None:
        self.passes = check_passes(self.passes)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        try:
            lowered = lower_to_aten(gm, example_inputs)
        except Exception as e:
            log.warning("dsx backend: could not lower the graph to ATen (%s: %s); compiling it without dsx passes",
                        type(e).__name__, e)
            self.reports.append({"skipped": f"{type(e).__name__}: {e}"})
            return compile_fx(gm, example_inputs, config_patches=self.inductor_config)
        counts = run_passes(lowered, resolve(self.passes, device=_graph_device(example_inputs)))
        dynamic = any(isinstance(x, torch.SymInt) for x in example_inputs)
        self.reports.append({"fusions": counts, **({"dynamic": True} if dynamic else {})})
        log.info("dsx backend: %s", counts)
        return compile_fx(lowered, example_inputs, config_patches=self.inductor_config)


def compile_backend(passes: list[str] | str | None = None, **inductor_config: Any) -> DsxBackend:
    """A fresh dsx backend for ``torch.compile(model, backend=dsx.compile_backend(...))``.

    ``passes``: ``None`` (device default), ``"all"`` or a list of pass names; extra keywords are inductor
    config patches. ``backend="dsx"`` uses the default instance ``dsx_backend``.
    """
    from torch._inductor import config as inductor

    for key in inductor_config:
        try:
            getattr(inductor, key)
        except AttributeError:
            raise ValueError(f"{key}: not a torch._inductor.config option (compile_backend's extra keywords patch "
                             "inductor's config)") from None
    return DsxBackend(passes, dict(inductor_config))


dsx_backend = DsxBackend()
