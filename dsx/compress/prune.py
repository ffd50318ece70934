"""``dsx.prune`` / ``dsx.Prune``: unstructured magnitude masks or structured pruning that physically shrinks layers.

Pruning changes outputs by design, so verification checks output structure and finiteness, not closeness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from dsx.compress.masks import apply_mask, count_nonzero, get_mask, source, sparsity
from dsx.compress.unstructured import IMPORTANCES, SCOPES, is_prunable, magnitude_prune, select_layers
from dsx.core.checks import check_names, check_positive_int
from dsx.core.inputs import Inputs
from dsx.core.transform import Transform


def check_fraction(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1) (the share of weights set to zero), got {value!r}")
    return float(value)


def check_max_error(max_error: Any) -> None:
    if max_error is not None and (isinstance(max_error, bool) or not isinstance(max_error, (int, float))
                                  or not max_error > 0 or not math.isfinite(max_error)):
        raise ValueError(f"max_error: expected a positive relative error or None, got {max_error!r}")


@dataclass
class Prune(Transform):
    """Prune ``amount`` (a fraction in [0, 1)) of a model's weights.

    Unstructured (default): magnitude masks on ``nn.Linear`` / ``nn.Conv*d`` / Hugging Face ``Conv1D`` weights
    (``dsx.compress.masks``: kept through training, folded by ``dsx.compress.make_permanent``); ``amount`` is the
    fraction of zeros each layer (``scope="local"``) or all of them together (``"global"``) end with, counting
    weights already pruned, which stay pruned. ``importance`` "l1" and "l2" both rank by |w| here.
    ``structured=True`` removes whole channels / heads / neurons (``dsx.compress.structured``) and needs
    ``example_inputs``; ``round_to`` keeps pruned widths multiples of it and ``calibration`` (batches, not saved)
    feeds data-driven importance. ``skip`` lists module names or ``"re:<regex>"`` patterns to leave dense.

    Verification: the tolerance is infinite unless ``max_error`` sets one, since pruning changes outputs by design;
    with ``example_inputs`` the outputs are still checked for the same structure, shapes and finiteness, and the
    measured error is recorded. After apply, ``config()`` names the exact ``layers`` (unstructured) or the
    ``plan`` (structured) so ``dsx.load`` rebuilds the same masks / shapes.
    """

    name = "prune"
    stage = "prune"

    amount: float
    structured: bool = False
    importance: str = "l1"
    scope: str = "local"
    round_to: int | None = None
    skip: Sequence[str] = ()
    calibration: Any = None
    max_error: float | None = None
    plan: dict[str, Any] | None = None
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        self.amount = check_fraction(self.amount, "amount")
        self.skip = check_names("skip", self.skip)
        if self.layers is not None:
            self.layers = check_names("layers", self.layers, patterns=False)
        if not isinstance(self.structured, bool):
            raise TypeError(f"structured: expected a bool, got {self.structured!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {self.scope!r}")
        if not self.structured:
            if self.importance not in IMPORTANCES:
                raise ValueError(f"importance: unstructured pruning supports {IMPORTANCES} (both rank by |w|), got "
                                 f"{self.importance!r}; data-driven importance needs structured=True")
            for field, value in (("round_to", self.round_to), ("calibration", self.calibration),
                                 ("plan", self.plan)):
                if value is not None:
                    raise ValueError(f"{field}: only structured pruning uses it; pass structured=True")
        check_positive_int("round_to", self.round_to, optional=True)
        check_max_error(self.max_error)
        self._resolved: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        settings = {"amount": self.amount, "structured": self.structured, "importance": self.importance,
                    "scope": self.scope, "round_to": self.round_to, "max_error": self.max_error}
        if self._resolved is not None:
            return {**settings, **self._resolved}
        return {**settings, "skip": list(self.skip), "plan": self.plan, "layers": self.layers}

    def tolerance_for(self, dtype: torch.dtype) -> float:
        return math.inf if self.max_error is None else self.max_error

    def __call__(self, model: nn.Module, example_inputs: Any = None) -> nn.Module:
        if self.structured and example_inputs is None:
            raise ValueError("structured pruning needs example_inputs (a Tensor, a tuple of args or a dict of "
                             "kwargs) to trace the layer dependencies")
        return super().__call__(model, example_inputs)

    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        params, nonzeros_before = count_nonzero(model)
        if self.structured:
            model, info = self._structured(model, inputs)
        else:
            info = self._unstructured(model)
        params_after, nonzeros_after = count_nonzero(model)
        totals = {"sparsity": round(1.0 - nonzeros_after / max(params_after, 1), 4), "params_before": params,
                  "params_after": params_after, "nonzeros_before": nonzeros_before, "nonzeros_after": nonzeros_after}
        return model, {**totals, **info}

    def _unstructured(self, model: nn.Module) -> dict[str, Any]:
        chosen, skipped = select_layers(model, is_prunable, self.skip, self.layers, "prune")
        if self.replay:
            for m in chosen.values():
                apply_mask(m, torch.ones_like(source(m), dtype=torch.bool))
        else:
            magnitude_prune(chosen, self.amount, self.scope)
        self._resolved = {"layers": sorted(chosen)}
        layer_sparsity = {n: round(sparsity(get_mask(m)), 4) for n, m in chosen.items()}
        return {"pruned": len(chosen), "layer_sparsity": layer_sparsity, "skipped": skipped}

    def _structured(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        from dsx.compress.structured import prune_structured

        model, info = prune_structured(model, self.amount, inputs, importance=self.importance, scope=self.scope,
                                       round_to=self.round_to, skip=self.skip, calibration=self.calibration,
                                       plan=self.plan)
        info = dict(info)
        self._resolved = {"plan": info.pop("plan")}
        return model, info


def prune(model: nn.Module, amount: float, *, structured: bool = False, example_inputs: Any = None,
          importance: str = "l1", scope: str = "local", round_to: int | None = None, skip: Sequence[str] = (),
          inplace: bool = False, **kwargs: Any) -> nn.Module:
    """Prune ``amount`` of ``model``'s weights (``dsx.Prune(amount, ...)(model, example_inputs)``; see ``Prune``).

    Args:
        model: the model to prune.
        amount: the fraction in [0, 1) of prunable weights to remove.
        structured: remove whole channels / heads / neurons (layers shrink) instead of masking single weights.
        example_inputs: inputs to trace layer dependencies (needed when ``structured``) and to verify on.
        importance: how channels are ranked (``"l1"``, ``"l2"``, data-driven ones with ``calibration``).
        scope: ``"local"`` (each layer loses ``amount``) or ``"global"`` (ranked across layers).
        round_to: structured widths stay multiples of it.
        skip: module names or ``"re:<regex>"`` patterns to leave dense (their children too).
        inplace: change ``model`` itself instead of a copy.
        **kwargs: the other ``Prune`` fields: ``calibration``, ``max_error``, ``verify``, ``plan``.

    Returns:
        The pruned model; ``dsx.history(result)[-1]["info"]`` holds the fraction removed and what was skipped.

    Raises:
        ValueError / TypeError: a bad argument, named in the message.
        dsx.VerificationError: outputs beyond ``max_error``, non-finite, or of another structure.

    Example:
        >>> small = dsx.prune(model, 0.3, structured=True, example_inputs=x)
        >>> masked = dsx.prune(model, 0.8, scope="global")
    """
    return Prune(amount, structured=structured, importance=importance, scope=scope, round_to=round_to, skip=skip,
                 inplace=inplace, **kwargs)(model, example_inputs)
