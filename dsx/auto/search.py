"""Build, verify and time each candidate plan against the original on this machine; keep the fastest that holds
the error budget, and return the original when nothing beats it beyond the measured noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dsx.auto.plans import Plan
from dsx.auto.workload import Workload
from dsx.core.compose import compose
from dsx.core.inputs import Inputs, model_device, run_model
from dsx.core.report import PlanRow, Report
from dsx.core.timing import paired_ms
from dsx.core.transform import METRICS, VerificationError, compare_outputs, eval_mode, history
from dsx.quant.quantize import Quantize, call_metric, state_bytes

MIN_GAIN = 0.03
"""A plan must be this much faster than the original (or its measured spread, if larger) to be returned."""

WARMUP_CALLS = 2
"""Workload calls on each plan before it is timed, so compiling (and recompiling for new shapes) is not timed."""

BUILD_ERRORS = (VerificationError, ValueError, TypeError, RuntimeError, NotImplementedError, ImportError,
                AssertionError)


@dataclass
class Measured:
    """A built candidate: the model, its report row."""

    model: nn.Module
    row: PlanRow


class Search:
    """One ``dsx.optimize`` search over ``plans`` for ``base`` (an eval-mode copy of the caller's model).

    ``batches`` are the inputs the error is measured on (the example inputs, then any calibration batches);
    ``budget`` the largest error allowed by ``metric`` (a name of ``METRICS`` or a callable on the model).
    """

    def __init__(self, base: nn.Module, inputs: Inputs, batches: list[Inputs], *, metric: str | Callable[..., float],
                 budget: float, lossy: bool, workload: Workload, passes: Any, budget_s: float | None,
                 progress: bool, rounds: int = 5) -> None:
        self.base, self.batches = base, batches
        self.example = inputs[1] or inputs[0]
        self.metric, self.budget, self.lossy = metric, budget, lossy
        self.workload, self.passes, self.budget_s, self.progress, self.rounds = (workload, passes, budget_s,
                                                                                 progress, rounds)
        with eval_mode(base):
            self.refs = [run_model(base, b) for b in batches]
            try:
                self.ref_work = workload.run(base)
            except Exception as e:
                raise ValueError(f"workload: raised {type(e).__name__} on the original model: {e}") from e
        self.resolved: dict[str, Quantize] = {}
        self.start = time.perf_counter()

    def error(self, model: nn.Module) -> float:
        """The candidate's output error by the search's metric (max over the batches)."""
        if callable(self.metric) and self.lossy:
            with eval_mode(model):
                return call_metric(self.metric, model)
        key = METRICS[self.metric] if self.lossy else "max_rel"
        with eval_mode(model):
            return max(compare_outputs(r, run_model(model, b, name="example_inputs (candidate)"))[key]
                       for r, b in zip(self.refs, self.batches))

    def build(self, plan: Plan) -> tuple[nn.Module, float, int]:
        """Build and verify ``plan``; within a lossy format keep the most sensitive layers float until the budget
        holds. Returns the model, its error and how many layers were kept float."""
        fmt = plan.name.removesuffix("+compile")
        data = [b[1] or b[0] for b in self.batches]
        first = (known := self.resolved.get(fmt)) is None
        calibration = data if plan.quantize is not None and plan.quantize.needs_calibration() else None
        quantize = known
        if first and plan.quantize is not None:
            quantize = Quantize(plan.quantize, calibration=calibration, progress=False)
        model = compose(*plan.transforms(quantize=quantize, passes=self.passes))(self.base, self.example)
        err = self.error(model)
        if err > self.budget and plan.quantize is not None and plan.quantize.quantizes_linears and first:
            budgeted = Quantize(plan.quantize, max_error=self.budget, metric=self.metric, calibration=data,
                                progress=False)
            model = compose(*plan.transforms(quantize=budgeted, passes=self.passes))(self.base, self.example)
            err = self.error(model)
        entry = next((e for e in history(model) if e["transform"] == "quantize"), None)
        if plan.quantize is not None and entry is not None and first:
            self.resolved[fmt] = Quantize(plan.quantize, layers=entry["config"]["layers"], calibration=calibration,
                                          progress=False)
        return model, err, len(entry["info"]["kept_float"]) if entry else 0

    def same_tokens(self, model: nn.Module) -> bool:
        out = self.workload.run(model)
        return not isinstance(out, torch.Tensor) or torch.equal(out, self.ref_work)

    def time(self, model: nn.Module) -> tuple[float, float, float]:
        """(candidate ms, speed-up over the original, spread), measured side by side."""
        _, ms, ratio, spread = paired_ms(lambda: self.workload.run(self.base), lambda: self.workload.run(model),
                                              rounds=self.rounds)
        return ms, ratio, spread

    def try_plan(self, plan: Plan) -> Measured | None:
        """Build, check and time one plan; ``None`` (with its report row in ``rows``) when it does not qualify."""
        try:
            return self._measure(plan)
        except BUILD_ERRORS as e:  # a plan that fails to build, or later in its workload, is reported, not raised
            reason = (str(e).splitlines() or [""])[0]
            self.rows.append(PlanRow(plan.name, f"failed: {type(e).__name__}: {reason}"))
            return None

    def _measure(self, plan: Plan) -> Measured | None:
        model, err, kept = self.build(plan)
        size = state_bytes(model) / 1e6
        if not err <= self.budget:
            self.rows.append(PlanRow(plan.name, "over budget", error=err, size_mb=size, kept_float=kept))
            return None
        if not self.lossy and self.workload.exact and not self.same_tokens(model):
            self.rows.append(PlanRow(plan.name, "generate() tokens differ", error=err, size_mb=size))
            return None
        for _ in range(WARMUP_CALLS):  # compiled plans compile here (a decoder's generate() recompiles as it grows)
            self.workload.run(model)
        ms, ratio, spread = self.time(model)
        row = PlanRow(plan.name, "ok", ms, spread, ratio, err, size, kept)
        self.rows.append(row)
        return Measured(model, row)

    def run(self, plans: Sequence[Plan]) -> tuple[nn.Module, Report]:
        """Try every plan (within ``budget_s``); return the winner (the original when nothing is faster) and the
        report."""
        self.rows: list[PlanRow] = []
        ms = paired_ms(lambda: self.workload.run(self.base), lambda: self.workload.run(self.base),
                       rounds=self.rounds)[0]
        original = PlanRow("original", "ok", ms, None, 1.0, 0.0, state_bytes(self.base) / 1e6)
        self.rows.append(original)
        best: Measured | None = None
        notes: list[str] = []
        for plan in tqdm(plans, desc="dsx.optimize", disable=not self.progress, leave=False):
            if self.budget_s is not None and time.perf_counter() - self.start > self.budget_s:
                self.rows.append(PlanRow(plan.name, "not tried: budget_s spent"))
                continue
            got = self.try_plan(plan)
            if got is not None and got.row.speedup > (best.row.speedup if best else 1.0):
                best = got
        if best is not None:  # confirm the pick against the original once more, side by side
            ms, ratio, spread = self.time(best.model)
            best.row.latency_ms, best.row.speedup, best.row.spread = ms, ratio, spread
            if ratio <= 1.0 + max(MIN_GAIN, spread):
                notes.append(f"the fastest plan, {best.row.plan}, measured {ratio:.2f}x (spread {spread:.1%}): not "
                             "faster beyond the noise, so the original is returned")
                best = None
        if best is None:
            original.won = True
            if not notes:
                notes.append("no plan was faster than the original: the original is returned (a copy)")
            model = self.base
        else:
            best.row.won = True
            model = best.model
        spent = time.perf_counter() - self.start
        notes.append(f"search took {spent:.1f} s")
        device = model_device(self.base).type
        name = self.metric if isinstance(self.metric, str) else "callable metric"
        return model, Report(self.rows, name if self.lossy else "max_rel", self.budget if self.lossy else None,
                             device, self.workload.describe, notes)
