"""``dsx.quantize`` / ``dsx.Quantize`` and ``dsx.convert``: swap linears (and embeddings) for quantized modules,
with layer selection, calibration, SmoothQuant, QAT and an accuracy budget, verified like every transform.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dsx.core.checks import check_flag, check_names, check_positive_int, matches
from dsx.core.dist import all_reduce_scalar, distributed_active
from dsx.core.modules import set_module
from dsx.core.inputs import MAX_BATCHES, Inputs, model_device, normalize_inputs, run_model
from dsx.core.transform import METRICS, Transform, compare_outputs, eval_mode
from dsx.quant.calibrate import Observers, check_batches, observe_inputs
from dsx.quant.cast import cast_float, compute_dtype
from dsx.quant.config import QuantConfig, resolve_config
from dsx.quant.embedding import QuantizedEmbedding
from dsx.quant.linear import QuantLinear, is_linear, linear_weight
from dsx.quant.observers import ChannelAbsMax, make_observer
from dsx.quant.qat import QATLinear
from dsx.quant.smoothquant import smoothing_scales
from dsx.quant.sync import sync_observers

BNB_CLASSES = ("Linear4bit", "Linear8bitLt")


def quantized_module(model: nn.Module) -> str | None:
    """The name of the first module already quantized (by dsx or bitsandbytes), None when there is none."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QATLinear, QuantizedEmbedding)) or type(m).__name__ in BNB_CLASSES:
            return name or "<the model itself>"
    return None


class _Smoothed(nn.Module):
    """Calibration stand-in: shows ``x * smooth`` to ``probe`` (where the observer hooks) and runs the layer on ``x``,
    so observers see the smoothed range while the rest of the model computes as before."""

    def __init__(self, inner: nn.Module, smooth: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.smooth, self.probe = inner, smooth, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.probe(x * self.smooth.to(x.dtype))
        return self.inner(x)


@dataclass
class Quantize(Transform):
    """Quantize a model's linear layers (and, with ``embeddings``, its embedding tables) to ``format``.

    ``format`` is a format string (see ``dsx.quant.valid_formats()``) or a config object such as
    ``dsx.quant.Int8Static(observer="percentile", smoothquant=0.5)``. ``skip`` lists module names (a name also
    skips its children) or ``"re:<regex>"`` patterns; ``filter_fn(name, module)`` returns False to keep a layer
    float. ``calibration`` (an iterable of batches; at most ``max_batches`` are read, default 256, so an endless
    iterator cannot hang) sets static activation scales and feeds the accuracy
    budget: with ``max_error`` the most sensitive layers stay float until the output error is within it, measured
    by ``metric``: ``"max_rel"`` (max relative error), ``"cosine"`` (1 - the smallest cosine similarity between an
    output row and the original's) or a callable ``metric(model) -> float`` on your own data. ``qat=True`` inserts
    fake-quant modules to train; ``dsx.convert`` then yields the int8 model.
    ``layers`` names exactly the modules to quantize (the history records it, and ``dsx.load`` replays it).

    Distributed (``distributed=None``: automatic when ``torch.distributed`` is initialized with more than one rank
    in ``process_group``, the default group when None; ``False`` opts out): every rank passes its own
    ``calibration`` batches (possibly none); observer statistics are all-reduced
    (``dsx.quant.sync.sync_observers``) and so is the budget's error (MAX: it is a max over batches), so
    every rank builds the model that one process calibrating on the union of the batches builds, bit for bit.
    Every rank calls it with the same model and settings; the batches of all ranks together must not be empty.
    """

    name = "quantize"
    stage = "compress"

    format: Any = "int8"
    skip: Sequence[str] = ()
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    max_error: float | None = None
    metric: Any = "max_rel"
    qat: bool = False
    calibration: Any = None
    progress: bool = True
    layers: list[str] | None = None
    max_batches: int = MAX_BATCHES
    distributed: bool | None = None
    process_group: Any = None

    def __post_init__(self) -> None:
        self.spec: QuantConfig = resolve_config(self.format)
        self.skip = check_names("skip", self.skip)
        if self.layers is not None:
            self.layers = check_names("layers", self.layers, patterns=False)
        check_flag("qat", self.qat)
        check_positive_int("max_batches", self.max_batches)
        check_flag("progress", self.progress)
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn: expected a callable (name, module) -> bool, got {type(self.filter_fn)}")
        if self.max_error is not None and not (isinstance(self.max_error, (int, float))
                                               and not isinstance(self.max_error, bool) and self.max_error > 0
                                               and math.isfinite(self.max_error)):
            raise ValueError(f"max_error: expected a positive error bound, got {self.max_error!r}")
        check_metric(self.metric)
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise TypeError(f"distributed: expected True, False or None (auto), got {self.distributed!r}")
        if self.qat and not self.spec.qat:
            qat_formats = sorted(QATLinear.formats)
            raise ValueError(f"qat: the {self.spec.format!r} format has no quantization-aware training; "
                             f"QAT supports {qat_formats}")
        self._resolved: list[str] | None = None
        self._sync = False

    def config(self) -> dict[str, Any]:
        if self._resolved is not None:
            return {"format": self.spec.to_dict(), "qat": self.qat, "layers": list(self._resolved)}
        return {"format": self.spec.to_dict(), "skip": list(self.skip), "max_error": self.max_error,
                "metric": self.metric if isinstance(self.metric, str) else "max_rel", "qat": self.qat,
                "layers": self.layers}

    def error_metric(self) -> str:
        return METRICS[self.metric] if isinstance(self.metric, str) else "max_rel"

    def tolerance_for(self, dtype: torch.dtype) -> float:
        if self.max_error is None:
            return self.spec.tolerance
        # A callable metric is the judge of the budget; the example-input check then only records the error.
        return self.max_error if isinstance(self.metric, str) else float("inf")

    def select(self, model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """The modules to quantize by name, and the eligible-looking ones left float with the reason."""
        chosen, skipped = {}, {}
        for name, m in model.named_modules():
            kind = "linear" if is_linear(m) and self.spec.quantizes_linears else (
                "embedding" if isinstance(m, nn.Embedding) and self.spec.embeddings else None)
            if kind is None:
                continue
            if self.layers is not None:
                if name in self.layers:
                    chosen[name] = m
                continue
            if any(matches(name, p) for p in self.skip):
                skipped[name] = "skip"
            elif self.filter_fn is not None and not self._keep(name, m):
                skipped[name] = "filter_fn"
            elif kind == "linear" and (reason := self.spec.rejects(m)) is not None:
                skipped[name] = reason
            else:
                chosen[name] = m
        if self.layers is not None and (missing := sorted(set(self.layers) - set(chosen))):
            raise ValueError(f"layers: {missing} are not quantizable modules of the model")
        for p in self.skip:
            if not any(matches(name, p) for name, _ in model.named_modules()):
                warnings.warn(f"quantize: skip pattern {p!r} matches no module", stacklevel=4)
        return chosen, skipped

    def _keep(self, name: str, module: nn.Module) -> bool:
        """``filter_fn(name, module)``, which must return a bool; its failures name it."""
        try:
            keep = self.filter_fn(name, module)
        except Exception as e:
            raise ValueError(f"filter_fn: raised {type(e).__name__} on layer {name!r}: {e}") from e
        if not isinstance(keep, bool):
            raise TypeError(f"filter_fn: must return True or False, returned {keep!r} for layer {name!r}")
        return keep

    def observe(self, model: nn.Module, modules: dict[str, nn.Module], batches: list[Any], observer: str,
                channel_absmax: bool = False, **kwargs: Any) -> dict[str, Observers]:
        """``observe_inputs`` on the local batches, then, when distributed, synced across the ranks."""
        if batches:
            stats = observe_inputs(model, modules, batches, observer, channel_absmax=channel_absmax,
                                   progress=self.progress, **kwargs)
        else:
            stats = {n: Observers(make_observer(observer, **kwargs), ChannelAbsMax() if channel_absmax else None)
                     for n in modules}
        if self._sync:

            sync_observers(stats, self.process_group)
        return stats

    def calibrate(self, model: nn.Module, linears: dict[str, nn.Module],
                  batches: list[Any]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Static activation ranges per linear (of ``x * smooth`` with SmoothQuant) and the smoothing factors."""
        spec = self.spec
        kwargs = {"percentile": spec.percentile} if spec.observer == "percentile" else {}
        smooth: dict[str, torch.Tensor] = {}
        if spec.smoothquant is not None:
            seen = self.observe(model, linears, batches, "minmax", channel_absmax=True)
            for name, obs in seen.items():
                if obs.activation.count:
                    s = smoothing_scales(obs.channel_absmax.amax(), linear_weight(linears[name])[0], spec.smoothquant)
                    smooth[name] = 1.0 / s
        probes = dict(linears)
        for name, factor in smooth.items():
            wrapper = _Smoothed(linears[name], factor)
            set_module(model, name, wrapper)
            probes[name] = wrapper.probe
        try:
            stats = self.observe(model, probes, batches, spec.observer, **kwargs)
        finally:
            for name in smooth:
                set_module(model, name, linears[name])
        return {n: o.activation.amax() for n, o in stats.items() if o.activation.count}, smooth

    def build(self, name: str, module: nn.Module, amax: dict[str, float], smooth: dict[str, torch.Tensor],
              solved: Any = None) -> nn.Module:
        """The quantized replacement of one module (``solved``: its entry of the format's ``solve``)."""
        spec = self.spec
        if isinstance(module, nn.Embedding):
            return QuantizedEmbedding.from_float(module, bits=spec.embeddings)
        if self.qat:
            return QATLinear.from_float(module, spec.format, amax.get(name))
        return spec.build(module, input_amax=amax.get(name), smooth=smooth.get(name), replay=self.replay,
                          solved=solved)

    def budget(self, model: nn.Module, built: dict[str, nn.Module], batches: list[Any]) -> list[str]:
        """Names to keep float so the output error stays within ``max_error``: the most sensitive layers first."""
        originals = {n: model.get_submodule(n) for n in built}
        with eval_mode(model):
            batches = [normalize_inputs(b) for b in batches]
            refs = [run_model(model, b, name="calibration batch") for b in batches]

        def error(names: Sequence[str]) -> float:
            for n in names:
                set_module(model, n, built[n])
            try:
                with eval_mode(model):
                    if callable(self.metric):
                        worst = call_metric(self.metric, model)
                    else:
                        key = METRICS[self.metric]
                        worst = max((compare_outputs(r, run_model(model, b, name="calibration batch"))[key]
                                     for r, b in zip(refs, batches)), default=0.0)
            finally:
                for n in names:
                    set_module(model, n, originals[n])
            if self._sync:  # the error over the union of the batches is the max of the ranks' errors

                worst = all_reduce_scalar(worst, "max", self.process_group)
            return worst

        names = list(built)
        if error(names) <= self.max_error:
            return []
        bar = tqdm(names, desc="dsx sensitivity", disable=not self.progress, leave=False)
        sensitivity = {n: error([n]) for n in bar}
        order = sorted(names, key=sensitivity.__getitem__, reverse=True)
        lo, hi = 1, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if error(order[mid:]) <= self.max_error:
                hi = mid
            else:
                lo = mid + 1
        return order[:lo]

    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        spec = self.spec
        if (done := quantized_module(model)) is not None:
            raise ValueError(f"quantize: the model is already quantized ({done}); quantize the float model instead "
                             "of quantizing twice")
        device = model_device(model)
        if (reason := spec.unsupported(device)) is not None:
            raise ValueError(f"config: {reason}; use 'fp8_weight_only' or 'int8' on this device")
        if spec.compute_dtype is not None and compute_dtype(model) is not None:
            raise ValueError(f"dtype: the model already computes in {compute_dtype(model)}; quantize the original "
                             "model instead")

        self._sync = distributed_active(self.distributed, self.process_group)
        chosen, skipped = self.select(model)
        batches = (check_batches(self.calibration, allow_empty=self._sync, max_batches=self.max_batches)
                   if self.calibration is not None else None)
        if batches is not None:
            batches = [kwargs or args for args, kwargs in batches]
            if self._sync and not all_reduce_scalar(len(batches), "sum", self.process_group):
                raise ValueError("calibration: the calibration data is empty on every rank; pass at least one batch")
        linears = {n: m for n, m in chosen.items() if not isinstance(m, nn.Embedding)}
        amax: dict[str, float] = {}
        smooth: dict[str, torch.Tensor] = {}
        solved: dict[str, Any] = {}
        if spec.needs_calibration() and linears and not self.replay:
            if batches is None and not self.qat:
                raise ValueError(f"calibration: the {spec.format!r} format needs calibration data (an iterable of "
                                 "input batches)")
            if batches is not None:
                solution = spec.solve(model, linears, batches, progress=self.progress)
                if solution is None:
                    amax, smooth = self.calibrate(model, linears, batches)
                else:
                    solved = solution
                if not self.qat:
                    for name in [n for n in linears if n not in amax and n not in solved]:
                        skipped[name] = "not called on the calibration data"
                        chosen.pop(name)
        built = {n: self.build(n, m, amax, smooth, solved.get(n)) for n, m in chosen.items()}
        kept: list[str] = []
        if self.max_error is not None and not self.replay and built:
            data = batches if batches is not None else ([inputs[1] or inputs[0]] if inputs is not None else None)
            if data is None:
                raise ValueError("max_error: the accuracy budget needs calibration data or example_inputs")
            kept = self.budget(model, built, data)
            for n in kept:
                built.pop(n)
                skipped[n] = f"kept float by max_error={self.max_error}"
        bytes_before = state_bytes(model)
        for n, m in built.items():
            m.train(chosen[n].training)
            model = set_module(model, n, m)
        if spec.compute_dtype is not None:
            cast_float(model, spec.compute_dtype)
        self._resolved = sorted(built)
        if not built and not self.replay:
            warnings.warn(f"quantize: no layer was quantized to {spec.format!r} (no eligible module"
                          + (f"; left float: {skipped}" if skipped else "") + "); the model is unchanged",
                          stacklevel=4)
        info = {"format": spec.format, "qat": self.qat, "quantized": len(built), "kept_float": kept,
                "skipped": skipped, "bytes_before": bytes_before, "bytes_after": state_bytes(model)}
        return model, info


def call_metric(metric: Callable[[nn.Module], float], model: nn.Module) -> float:
    """A callable metric's value on ``model``, which must be a finite number.

    Raises:
        ValueError: the callable raised, or returned NaN / inf / something that is not a number.
    """
    try:
        value = metric(model)
    except Exception as e:
        raise ValueError(f"metric: the callable raised {type(e).__name__}: {e}") from e
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)) or not math.isfinite(float(value)):
        raise ValueError(f"metric: the callable returned {value!r}; it must return a finite error")
    return float(value)


def check_metric(metric: Any) -> None:
    """Raise unless ``metric`` names an output-error metric or is a callable ``metric(model) -> float``."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {sorted(METRICS)} or a callable metric(model) -> float, "
                             f"got {metric!r}")
    elif not callable(metric):
        raise TypeError(f"metric: expected one of {sorted(METRICS)} or a callable metric(model) -> float, "
                        f"got {type(metric).__name__}")


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@dataclass
class Convert(Transform):
    """Turn a QAT model (``dsx.quantize(m, ..., qat=True)``, trained) into the real int8 model, keeping the learned
    scales: integer weights ``clamp(round(w / scale))`` and the learned activation scale."""

    name = "convert"
    stage = "compress"

    def tolerance_for(self, dtype: torch.dtype) -> float:
        return 0.05

    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        names = [n for n, m in model.named_modules() if isinstance(m, QATLinear)]
        if not names:
            raise ValueError("convert: the model has no QAT modules; quantize it with dsx.quantize(model, 'int8', "
                             "qat=True) and train it first")
        for n in names:
            module = model.get_submodule(n)
            model = set_module(model, n, module.to_quantized().train(module.training))
        return model, {"converted": len(names)}


def quantize(model: nn.Module, config: str | QuantConfig | dict[str, Any] = "int8", *, calibration: Any = None,
             skip: Sequence[str] = (), filter_fn: Callable[[str, nn.Module], bool] | None = None,
             max_error: float | None = None, metric: Any = "max_rel", qat: bool = False, example_inputs: Any = None,
             progress: bool = True, inplace: bool = False, verify: bool = True, distributed: bool | None = None,
             process_group: Any = None, max_batches: int = MAX_BATCHES) -> nn.Module:
    """Quantize ``model``'s linear layers (``dsx.Quantize(config, ...)(model, example_inputs)``; see ``Quantize``).

    Args:
        model: the float model (not already quantized).
        config: a format name (``dsx.quant.valid_formats()``: ``"int8"``, ``"int8_static"``, ``"int8_weight_only"``,
            ``"int4_weight_only"``, ``"fp8"``, ...), a config object such as ``dsx.quant.Int8Static(...)``, or its
            dict form.
        calibration: batches for static scales, GPTQ and the accuracy budget (at most ``max_batches`` read).
        skip: module names or ``"re:<regex>"`` patterns to keep float (their children too).
        filter_fn: ``filter_fn(name, module) -> bool``; False keeps a layer float.
        max_error: accuracy budget: the most sensitive layers stay float until ``metric`` is within it.
        metric: ``"max_rel"``, ``"cosine"`` or a callable ``metric(model) -> float``.
        qat: insert fake-quant layers to train (``dsx.convert`` finishes them).
        example_inputs: inputs to verify on (and to measure the budget when there is no calibration).
        progress: show a progress bar for calibration and the budget search.
        inplace: change ``model`` itself instead of a copy.
        verify: compare the outputs on the example inputs against the format's tolerance.
        distributed: all-reduce calibration statistics across ranks (None: when a process group has > 1 rank).
        process_group: the group for ``distributed``.
        max_batches: how many calibration batches are read at most.

    Returns:
        The quantized model (same class; dsx quantized layers in place of the linears), with a history entry.

    Raises:
        ValueError / TypeError: a bad argument (named in the message), an unknown format, a format this device
            cannot run, or an already quantized model.
        dsx.VerificationError: outputs outside the format's tolerance (or ``max_error``) on the example inputs.

    Example:
        >>> q = dsx.quantize(model, "int8", example_inputs=x)
        >>> q = dsx.quantize(model, "int8", calibration=batches, max_error=0.01, metric="cosine")
    """
    return Quantize(config, skip=skip, filter_fn=filter_fn, max_error=max_error, metric=metric, qat=qat,
                    calibration=calibration, max_batches=max_batches,
                    progress=progress, inplace=inplace, verify=verify, distributed=distributed,
                    process_group=process_group)(model, example_inputs)


def convert(model: nn.Module, example_inputs: Any = None, *, inplace: bool = False, verify: bool = True) -> nn.Module:
    """The int8 model of a trained QAT model, with its learned scales (see ``Convert``)."""
    return Convert(inplace=inplace, verify=verify)(model, example_inputs)
