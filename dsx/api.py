"""The one-liner: ``dsx.optimize(model, example_inputs)`` measures candidate plans on this machine and returns the
fastest one within the error budget, as an instance of the model's own class (a drop-in replacement).

Explicit ``prune=`` / ``sparsity=`` / ``quantize=`` force those steps; the search then only decides on compiling.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Sequence

import torch.nn as nn

from dsx.auto.plans import candidates, check_formats
from dsx.auto.search import Search
from dsx.auto.workload import default_workload, user_workload
from dsx.compress.prune import Prune
from dsx.compress.sparsity import Sparsify
from dsx.core.compose import compose
from dsx.core.checks import check_flag
from dsx.core.inputs import check_finite_parameters, check_module, model_device, normalize_inputs, run_model
from dsx.core.report import REPORT_ATTR
from dsx.core.transform import Transform, output_dtype
from dsx.graph.pass_manager import check_passes
from dsx.quant.calibrate import check_batches
from dsx.quant.config import QuantConfig
from dsx.quant.quantize import Quantize, check_metric


def _check_args(max_error: Any, metric: Any, budget_s: Any, compile: Any, workload: Any) -> None:
    if max_error is not None and (isinstance(max_error, bool) or not isinstance(max_error, (int, float))
                                  or not math.isfinite(max_error) or max_error < 0):
        raise ValueError(f"max_error: expected None (lossless) or a finite error bound >= 0, got {max_error!r}")
    check_metric(metric)
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float))
                                 or not budget_s > 0):
        raise ValueError(f"budget_s: expected None or a positive number of seconds, got {budget_s!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile: expected True or False, got {compile!r}")
    if workload is not None and not callable(workload):
        raise TypeError(f"workload: expected a callable workload(model) or None, got {type(workload).__name__}")


def _forced_steps(prune: Any, structured: bool, sparsity: Any, quantize: Any, calibration: Any,
                  progress: bool) -> list[Transform]:
    """The steps ``prune=`` / ``sparsity=`` / ``quantize=`` force; their own checks' errors name those arguments."""
    steps: list[Transform] = []
    for arg, value, build in (("prune", prune, lambda: Prune(prune, structured=structured)),
                              ("sparsity", sparsity, lambda: Sparsify(sparsity)),
                              ("quantize", quantize, lambda: Quantize(quantize, calibration=calibration,
                                                                       progress=progress))):
        if value is None:
            continue
        try:
            steps.append(build())
        except (TypeError, ValueError) as e:
            raise type(e)(f"{arg}: {e}") from None
    return steps


def optimize(model: nn.Module, example_inputs: Any, *, max_error: float | None = None,
             metric: str | Callable[[nn.Module], float] = "max_rel", calibration: Any = None,
             formats: Sequence[str | QuantConfig] | None = None, budget_s: float | None = None,
             compile: bool = True, passes: list[str] | str | None = None,
             workload: Callable[[nn.Module], Any] | None = None, prune: float | None = None,
             structured: bool = False, sparsity: str | None = None, quantize: str | QuantConfig | None = None,
             progress: bool = True, inplace: bool = False) -> nn.Module:
    """The fastest verified plan for ``model`` on this machine, as an instance of its own class.

    Candidate plans (the compiled model; with ``max_error``, every format of the registry fast on this device,
    alone, mixed with bf16 / fp16 where the hardware computes those natively, and compiled) are built, verified on
    ``example_inputs`` (and ``calibration``) and timed side by side with the original; the fastest that holds the
    budget wins. Within a lossy format the most sensitive layers stay float until the budget holds. When nothing
    beats the original beyond the measured noise, the original (a copy) is returned. ``dsx.report(result)`` lists
    every plan tried; ``dsx.save`` / ``dsx.load`` replay the chosen one without searching.

    Args:
        model: the model (not changed unless ``inplace=True``); the result is in eval mode.
        example_inputs: a Tensor, a tuple of args or a dict of kwargs the model runs on.
        max_error: None (lossless: fp32 rounding, 1e-4 relative) or the output error allowed, by ``metric``.
        metric: ``"max_rel"`` (max relative output error), ``"cosine"`` (1 - the smallest cosine similarity of an
            output row to the original's) or a callable ``metric(model) -> float`` on your own data.
        calibration: batches for calibrated formats (``int8_static``); also measured for the error.
        formats: the formats to try (names such as ``"int8"``, ``"int8+bf16"``, ``"2:4"``, or dsx.quant configs);
            None for every format fast on this device.
        budget_s: stop trying new plans after this many seconds.
        compile: also try each plan under ``torch.compile(backend="dsx")`` (on the module itself: same class).
        passes: the dsx passes of the compiled plans (None: the device default).
        workload: ``workload(model)``, the call to time; default: ``generate()`` of 16 tokens for Hugging Face
            generative models, else the forward on the example inputs.
        prune, structured, sparsity, quantize: force these steps (``dsx.prune`` / ``dsx.sparsify`` /
            ``dsx.quantize``); the search then only decides whether compiling helps.
        progress: show a progress bar.
        inplace: transform ``model`` itself.

    Returns:
        The chosen model (same class as ``model``).

    Raises:
        TypeError, ValueError: a bad argument (named in the message), or example inputs the model raises on.
        dsx.VerificationError: a forced step's outputs drift past its tolerance.

    Example:
        >>> fast = dsx.optimize(model, x)                                    # lossless: within fp32 rounding
        >>> fast = dsx.optimize(model, x, max_error=0.01, metric="cosine")   # lossy formats allowed
        >>> print(dsx.report(fast))
    """
    check_module(model)
    check_finite_parameters(model)
    check_flag("inplace", inplace)
    check_flag("progress", progress)
    inputs = normalize_inputs(example_inputs)
    _check_args(max_error, metric, budget_s, compile, workload)
    formats = check_formats(formats)
    passes = check_passes(passes)
    if structured and prune is None:
        raise ValueError("structured: needs prune= (the fraction of parameters to remove)")
    batches = [inputs] + ([] if calibration is None else check_batches(calibration))
    forced = _forced_steps(prune, structured, sparsity, quantize, calibration, progress)
    base = copy.deepcopy(model).eval()
    run_model(base, inputs)
    if forced:
        if max_error is not None or formats is not None:
            warnings.warn("max_error / formats: ignored, prune= / sparsity= / quantize= force the plan", stacklevel=2)
        base = compose(*forced, inplace=True)(base, example_inputs)
    if max_error is None and not forced:
        ignored = [name for name, given in (("metric", metric != "max_rel"), ("formats", formats is not None)) if given]
        if ignored:
            warnings.warn(f"{' / '.join(ignored)}: ignored without max_error (the lossless default tries no lossy "
                          "format and holds outputs to fp32 rounding)", stacklevel=2)
    lossless = max_error is None or bool(forced)
    work = user_workload(workload) if workload is not None else default_workload(base, inputs)
    budget = Transform.tolerance[output_dtype(run_model(base, inputs))] if lossless else float(max_error)
    plans = candidates(model_device(base), lossy=not lossless, formats=formats, calibrated=calibration is not None,
                       compile=compile)
    search = Search(base, inputs, batches, metric=metric, budget=budget, lossy=not lossless, workload=work,
                    passes=passes, budget_s=budget_s, progress=progress)
    result, report = search.run(plans)
    if forced:
        report.notes.insert(0, "forced steps: " + ", ".join(t.name for t in forced) + " (errors are against them)")
    if inplace:
        result = _apply_in_place(model, result)
    setattr(result, REPORT_ATTR, report.to_dict())
    return result


def _apply_in_place(model: nn.Module, result: nn.Module) -> nn.Module:
    """Give ``model`` the chosen plan's modules and state: the caller's object becomes the result."""
    model.__dict__.clear()
    model.__dict__.update(result.__dict__)
    if getattr(model, "_compiled_call_impl", None) is not None:
        model._compiled_call_impl.module = model
    return model

