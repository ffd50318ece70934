"""The ``Fuse`` transform: capture a model, run the dsx graph passes, verify, report what fired.

It is what ``dsx.optimize`` runs; the result is a GraphModule (or the model with captured parts) for inference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from dsx.core.inputs import Inputs, model_device, run_model
from dsx.core.transform import Transform
from dsx.graph.capture import accepts, capture_inputs
from dsx.graph.fx_utils import drop_unused_state
from dsx.graph.pass_manager import available_passes, check_passes, resolve, run_passes


@dataclass
class Fuse(Transform):
    """Rewrite a model's graph with the dsx fusion passes (``passes=None``: the default set for its device).

    The result is specialized to the example input shapes unless ``dynamic_batch=True`` keeps dim 0 dynamic.
    """

    name = "fuse"
    stage = "fuse"
    needs_inputs = True

    passes: list[str] | str | None = None
    dynamic_batch: bool = False

    def __post_init__(self) -> None:
        self.passes = check_passes(self.passes)
        if not isinstance(self.dynamic_batch, bool):
            raise TypeError(f"dynamic_batch: expected True or False, got {self.dynamic_batch!r}")

    @staticmethod
    def fixed_kwargs(model: nn.Module, inputs: Inputs) -> dict[str, Any]:
        """Keyword arguments baked into the capture: Hugging Face decoders run without a KV cache."""
        return {"use_cache": False} if accepts(model, "use_cache") and "use_cache" not in inputs[1] else {}

    @staticmethod
    def check_eval(model: nn.Module) -> None:
        """Refuse a training-mode model before anything runs it (a forward would update its BatchNorm statistics)."""
        if model.training:
            raise ValueError("fuse: the model is in training mode; call model.eval() first (fusion is for inference)")

    def reference(self, model: nn.Module, inputs: Inputs) -> Any:
        self.check_eval(model)
        args, kwargs = inputs
        return run_model(model, (args, {**kwargs, **self.fixed_kwargs(model, inputs)}))

    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        self.check_eval(model)
        assert inputs is not None
        captured = capture_inputs(model, inputs, dynamic_batch=self.dynamic_batch,
                                  fixed_kwargs=self.fixed_kwargs(model, inputs))
        selected = resolve(self.passes, device=model_device(model).type)
        fired: Counter[str] = Counter({p.name: 0 for p in selected})
        for gm in captured.graphs.values():
            fired.update(run_passes(gm, selected))
            drop_unused_state(gm)
        info = {"fusions": dict(fired), "captured": sorted(captured.graphs), "eager": captured.eager,
                "notes": captured.notes}
        return captured.module, info


def fusions(model: nn.Module) -> dict[str, int]:
    """How many rewrites each pass made on ``model`` (summed over every ``fuse`` step in its history)."""
    total: Counter[str] = Counter()
    for entry in getattr(model, "_dsx_history", []):
        if entry["transform"] == Fuse.name:
            total.update(entry["info"]["fusions"])
    order = list(available_passes())
    return {k: total[k] for k in sorted(total, key=lambda k: order.index(k) if k in order else len(order))}
