"""The ``Compile`` transform: ``torch.compile`` with the dsx backend on the module itself, so it stays a drop-in.

The model keeps its class, attributes and methods (Hugging Face ``generate()`` included) and any input shape works;
as with ``nn.Module.compile``, a ``copy.deepcopy`` of it is not compiled (``dsx.load`` replays the step).
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dsx.core.inputs import Inputs
from dsx.core.transform import HISTORY_ATTR, Transform
from dsx.graph.backend import DsxBackend
from dsx.graph.pass_manager import check_passes

_IDS = itertools.count()
REDUCED = 0.1
"""The least tolerance of a compiled model with quantized or half-precision layers (int8's default)."""


def _entry() -> types.FunctionType:
    """A fresh function (its own code object, so its own dynamo cache) that runs a module's normal call."""

    def call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return module._call_impl(*args, **kwargs)

    n = next(_IDS)
    code = call.__code__.replace(co_name=f"dsx_compiled_{n}", co_qualname=f"dsx_compiled_{n}")
    return types.FunctionType(code, call.__globals__, code.co_name)


class CompiledCall:
    """What ``nn.Module.__call__`` runs once a module is compiled (``module._compiled_call_impl``); it compiles on
    first use, through a function of its own so that each compiled model has its own dynamo cache."""

    def __init__(self, module: nn.Module, passes: list[str] | str | None, dynamic: bool | None) -> None:
        self.module, self.passes, self.dynamic = module, passes, dynamic
        self._fn: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fn is None:
            self._fn = torch.compile(_entry(), backend=DsxBackend(self.passes), dynamic=self.dynamic)
        return self._fn(self.module, *args, **kwargs)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs through ``torch.compile`` (``Compile``, ``nn.Module.compile``)."""
    return getattr(model, "_compiled_call_impl", None) is not None


@dataclass
class Compile(Transform):
    """``torch.compile(backend="dsx")`` applied to the module in place of a wrapper: same class, any shapes.

    ``passes`` as for the backend (None: the device default); ``dynamic`` as for ``torch.compile`` (None: compile
    for the first shapes, then generalize when they change). A model with quantized or bf16 / fp16 layers is held
    to its quantize step's tolerance (at least ``REDUCED``) instead of fp32's 1e-4: inductor reorders float math, which
    can move a value across an int8 rounding step or a half-precision ulp, and later layers amplify that.
    """

    name = "compile"
    stage = "fuse"

    passes: list[str] | str | None = None
    dynamic: bool | None = None

    def __post_init__(self) -> None:
        self.passes = check_passes(self.passes)
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise TypeError(f"dynamic: expected True, False or None, got {self.dynamic!r}")
        self._reduced: float | None = None

    def tolerance_for(self, dtype: torch.dtype) -> float:
        return max(super().tolerance_for(dtype), self._reduced or 0.0)

    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        steps = [e for e in getattr(model, HISTORY_ATTR, []) if e["transform"] == "quantize"]
        self._reduced = max([REDUCED, *((e.get("error") or {}).get("tolerance") or 0.0 for e in steps)]) if steps \
            else None
        if is_compiled(model):
            raise ValueError("compile: the model is already compiled; compile the uncompiled model")
        model._compiled_call_impl = CompiledCall(model, self.passes, self.dynamic)
        return model, {"backend": "dsx"}
