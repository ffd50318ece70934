"""Chain dsx transforms into one callable that validates the stage order up front and copies the model once.

``compose(Prune(0.3), Quantize("int8"), Fuse())(model, x)`` equals calling them in turn, without a copy per step.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from dsx.core.inputs import check_module, normalize_inputs
from dsx.core.transform import STAGES, Transform


@dataclass(frozen=True)
class Compose:
    """Transforms applied in order: ``c(model, example_inputs=None) -> nn.Module`` (a copy unless ``inplace``)."""

    transforms: tuple[Transform, ...]
    inplace: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "transforms", tuple(self.transforms))
        if not self.transforms:
            raise ValueError("compose: needs at least one transform")
        for i, t in enumerate(self.transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"compose: item {i} is a {type(t).__name__}, not a dsx Transform")
        for prev, t in zip(self.transforms, self.transforms[1:]):
            if STAGES.index(t.stage) < STAGES.index(prev.stage):
                raise ValueError(
                    f"compose: {t.name!r} ({t.stage}) cannot follow {prev.name!r} ({prev.stage}); "
                    f"transforms run in the order {' -> '.join(STAGES)}"
                )

    def __call__(self, model: nn.Module, example_inputs: Any = None) -> nn.Module:
        check_module(model)
        if example_inputs is not None:
            normalize_inputs(example_inputs)
        elif needy := [t.name for t in self.transforms if t.needs_inputs]:
            raise ValueError(f"compose: {needy} need example_inputs (a Tensor, a tuple of args or a dict of kwargs)")
        # Stages are non-decreasing, so the first transform is the one a model's past history could conflict with.
        self.transforms[0].check_order(model)
        result = model if self.inplace else copy.deepcopy(model)
        for t in self.transforms:
            result = dataclasses.replace(t, inplace=True)(result, example_inputs)
        return result


def compose(*transforms: Transform, inplace: bool = False) -> Compose:
    """Chain ``transforms`` (stage order prune -> distill -> compress -> fuse -> export) into one callable."""
    return Compose(transforms, inplace=inplace)
