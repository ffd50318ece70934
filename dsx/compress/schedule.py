"""Gradual pruning during fine-tuning: the cubic sparsity ramp of Zhu & Gupta (2017), applied as growing masks.

``PruningSchedule(start, end, steps, amount)`` gives the target sparsity at a training step; ``step(model, i)``
raises the model's magnitude masks to it in place (pruned weights stay pruned), recorded as ``dsx.prune`` steps.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch.nn as nn

from dsx.compress.prune import Prune, check_fraction
from dsx.core.checks import check_names
from dsx.core.inputs import check_module
from dsx.compress.unstructured import SCOPES


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int (a training step or count), got {value!r}")
    return value


@dataclass
class PruningSchedule:
    """Sparsity rising from ``initial`` at step ``start`` to ``amount`` at step ``end`` along a cubic ramp, in
    ``steps`` pruning events evenly spaced after ``start`` (the last at ``end``); 0 before ``start``.

    ``s(t) = amount + (initial - amount) * (1 - k / steps) ** 3`` with ``k`` the number of events reached by step
    ``t``: sparsity grows fast early, while the network can still recover, and slowly near the end. ``step(model,
    t)`` in the training loop applies unstructured magnitude pruning (``scope``, ``skip`` as in ``dsx.Prune``) when
    the target rises; optimizers keep working, since masking keeps the same parameter objects.
    """

    start: int
    end: int
    steps: int
    amount: float
    initial: float = 0.0
    scope: str = "local"
    skip: Sequence[str] = ()
    _applied: weakref.WeakKeyDictionary[nn.Module, float] = field(default_factory=weakref.WeakKeyDictionary,
                                                                   init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("start", "end", "steps"):
            _check_int(getattr(self, name), name)
        if self.start >= self.end:
            raise ValueError(f"start: must be before end, got start={self.start}, end={self.end}")
        if not 1 <= self.steps <= self.end - self.start:
            raise ValueError(f"steps: expected between 1 and end - start = {self.end - self.start} pruning events, "
                             f"got {self.steps}")
        self.amount = check_fraction(self.amount, "amount")
        self.initial = check_fraction(self.initial, "initial")
        if self.initial > self.amount:
            raise ValueError(f"initial: must not exceed amount ({self.amount}), got {self.initial}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {self.scope!r}")
        self.skip = check_names("skip", self.skip)

    def events(self) -> list[int]:
        """The training steps at which the target sparsity rises."""
        span = self.end - self.start
        first = [self.start] if self.initial > 0 else []
        return first + [self.start + math.ceil(i * span / self.steps) for i in range(1, self.steps + 1)]

    def sparsity(self, step: int) -> float:
        """The target fraction of pruned weights at training step ``step``."""
        _check_int(step, "step")
        if step < self.start:
            return 0.0
        reached = min(self.steps, (step - self.start) * self.steps // (self.end - self.start))
        return self.amount + (self.initial - self.amount) * (1 - reached / self.steps) ** 3

    def step(self, model: nn.Module, step: int) -> bool:
        """Prune ``model`` in place up to ``sparsity(step)`` if that is above what this schedule last applied to it
        (calls may skip steps); True when the masks were raised."""
        check_module(model)
        target = self.sparsity(step)
        if target <= self._applied.get(model, 0.0):
            return False
        Prune(target, scope=self.scope, skip=self.skip, inplace=True, verify=False)(model)
        self._applied[model] = target
        return True
