"""The Transform base: a dataclass config that, called on a model, copies, rewrites, verifies and records.

Every dsx capability (fuse, quantize, prune, ...) subclasses it, so all of them share one contract.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from dsx.core.inputs import Inputs, check_finite_parameters, check_module, describe, normalize_inputs, run_model

HISTORY_ATTR = "_dsx_history"
ORIGIN_ATTR = "_dsx_origin"

STAGES = ("prune", "distill", "compress", "fuse", "export")


class VerificationError(RuntimeError):
    """A transformed model's outputs differ from the original's by more than the transform's tolerance."""


METRICS = {"max_rel": "max_rel", "cosine": "cosine_error"}
"""Output-error metrics by name, and the key of ``compare_outputs``' result that holds each."""


def _min_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine similarity between matching rows (last dim) of two finite float64 tensors."""
    rows_a = a.reshape(-1, a.shape[-1]) if a.dim() >= 2 else a.reshape(1, -1)
    rows_b = b.reshape(rows_a.shape)
    keep = rows_a.isfinite().all(dim=1) & rows_b.isfinite().all(dim=1)
    rows_a, rows_b = rows_a[keep], rows_b[keep]
    if rows_a.numel() == 0:
        return 1.0
    na, nb = rows_a.norm(dim=1), rows_b.norm(dim=1)
    cos = (rows_a * rows_b).sum(dim=1) / (na * nb).clamp_min(1e-300)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    return float(cos.min())


def compare_outputs(reference: Any, candidate: Any) -> dict[str, float]:
    """Largest absolute and relative (to the reference's max magnitude) error over all tensor outputs, and the
    cosine error (1 - the smallest cosine similarity between an output row and the reference's).

    Raises:
        VerificationError: the outputs differ in structure, shape or where they are non-finite, or no tensor
            element could be compared at all (every output empty or non-finite).
    """
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    new_leaves, new_spec = pytree.tree_flatten(candidate)
    if len(ref_leaves) != len(new_leaves):
        raise VerificationError(
            f"output structure changed: {len(ref_leaves)} outputs before, {len(new_leaves)} after "
            f"({ref_spec} vs {new_spec})"
        )
    worst = {"max_abs": 0.0, "max_rel": 0.0, "cosine_error": 0.0}
    tensors = compared = 0
    for i, (a, b) in enumerate(zip(ref_leaves, new_leaves)):
        if not isinstance(a, torch.Tensor):
            # Plain values must match; opaque objects (e.g. a Hugging Face KV cache) are not compared.
            if isinstance(a, (bool, int, float, str, type(None))) and a != b:
                raise VerificationError(f"output {i} changed: {a!r} before, {b!r} after")
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise VerificationError(f"output {i}: expected shape {tuple(a.shape)}, got {got}")
        tensors += 1
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        if not (a64.isfinite() == b64.isfinite()).all():
            raise VerificationError(f"output {i}: non-finite values differ between the original and the result")
        fin = a64.isfinite()
        if not fin.any():
            continue
        compared += 1
        diff = (a64[fin] - b64[fin]).abs().max().item()
        scale = a64[fin].abs().max().item()
        worst["max_abs"] = max(worst["max_abs"], diff)
        worst["max_rel"] = max(worst["max_rel"], diff / max(scale, 1e-12))
        if a.is_floating_point() or a.is_complex():
            worst["cosine_error"] = max(worst["cosine_error"], 1.0 - _min_row_cosine(a64, b64))
    if tensors and not compared:
        raise VerificationError("outputs: nothing to compare, every tensor output is empty or entirely non-finite")
    return worst


def output_dtype(out: Any) -> torch.dtype:
    """The lowest-precision floating dtype among a model's tensor outputs (float32 if none)."""
    floats = [x.dtype for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return min(floats, key=lambda d: torch.finfo(d).bits, default=torch.float32)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no dropout, running BN stats), then restore every submodule's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """On a machine with CUDA, convolutions and matmuls in true fp32 (no TF32) inside, the caller's settings restored
    after: cuDNN runs fp32 convolutions in TF32 by default, whose ~5e-4 relative error would fail the 1e-4 fp32
    tolerance of a verification (a BN-folded conv net is off by that much from its own unfolded self). The flags
    are torch's ``allow_tf32`` ones, whose getters the exporters read."""
    if not torch.cuda.is_available():
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = False
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def history(model: nn.Module) -> list[dict[str, Any]]:
    """What dsx transforms were applied to ``model``, oldest first (JSON-able entries)."""
    return list(getattr(model, HISTORY_ATTR, []))


@dataclass
class Transform(abc.ABC):
    """Base of every dsx transform: ``t(model, example_inputs=None) -> nn.Module``.

    Subclasses set ``name`` and ``stage`` and implement ``apply``; the base copies the model unless
    ``inplace=True``, verifies outputs on the example inputs (``verify=True``), and records the step.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "compress"
    needs_inputs: ClassVar[bool] = False
    tolerance: ClassVar[dict[torch.dtype, float]] = {torch.float64: 1e-7, torch.float32: 1e-4,
                                                     torch.bfloat16: 2e-2, torch.float16: 1e-2}
    registry: ClassVar[dict[str, type[Transform]]] = {}

    inplace: bool = field(default=False, kw_only=True)
    verify: bool = field(default=True, kw_only=True)
    replay: bool = field(default=False, kw_only=True)
    """Rebuild structure only: ``dsx.load`` sets it, since the weights (and calibrated scales) come from the file."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            if cls.stage not in STAGES:
                raise ValueError(f"{cls.__name__}.stage must be one of {STAGES}")
            Transform.registry[cls.name] = cls

    @abc.abstractmethod
    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        """Rewrite ``model`` (already a private copy unless inplace) and return it with a JSON-able info dict."""

    def tolerance_for(self, dtype: torch.dtype) -> float:
        """The max relative output error allowed for a model whose outputs are ``dtype``."""
        return self.tolerance.get(dtype, 1e-4)

    def error_metric(self) -> str:
        """The ``compare_outputs`` key the tolerance bounds (``"max_rel"`` unless a transform measures otherwise)."""
        return "max_rel"

    def reference(self, model: nn.Module, inputs: Inputs) -> Any:
        """The original model's outputs (in eval mode) that the result is verified against (override to adjust
        the call)."""
        with eval_mode(model):
            return run_model(model, inputs)

    def config(self) -> dict[str, Any]:
        """The JSON-able settings of this transform (everything but ``inplace`` / ``verify`` / ``replay``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("inplace", "verify", "replay")}

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any] | None = None) -> Transform:
        """Rebuild a registered transform from its name and ``config()``."""
        if name not in Transform.registry:
            raise ValueError(f"unknown transform {name!r}; known transforms are {sorted(Transform.registry)}")
        return Transform.registry[name](**(config or {}))

    def check_order(self, model: nn.Module) -> None:
        """Refuse to run after a transform of a later stage (e.g. quantize after fuse)."""
        mine = STAGES.index(self.stage)
        for entry in history(model):
            if STAGES.index(entry["stage"]) > mine:
                raise ValueError(
                    f"cannot apply {self.name!r} after {entry['transform']!r}: dsx transforms run in the order "
                    f"{' -> '.join(STAGES)}; apply {self.name!r} to the model before {entry['transform']!r}"
                )

    def __call__(self, model: nn.Module, example_inputs: Any = None) -> nn.Module:
        for flag in ("inplace", "verify", "replay"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag}: expected True or False, got {getattr(self, flag)!r}")
        check_module(model)
        check_finite_parameters(model)
        inputs = None if example_inputs is None else normalize_inputs(example_inputs)
        if inputs is None and self.needs_inputs:
            raise ValueError(f"{self.name}: example_inputs are required "
                             "(a Tensor, a tuple of args or a dict of kwargs)")
        self.check_order(model)
        with full_fp32():
            reference = self.reference(model, inputs) if inputs is not None and self.verify else None
        past = history(model)
        origin = getattr(model, ORIGIN_ATTR, f"{type(model).__module__}.{type(model).__qualname__}")
        target = model if self.inplace else copy.deepcopy(model)
        result, info = self.apply(target, inputs)
        entry: dict[str, Any] = {"transform": self.name, "stage": self.stage, "config": self.config(),
                                 "inputs": describe(inputs) if inputs is not None else None, "info": info}
        if inputs is not None and self.verify:
            with eval_mode(result), full_fp32():
                out = run_model(result, inputs, name="example_inputs (transformed model)")
            err = compare_outputs(reference, out)
            tol = self.tolerance_for(output_dtype(reference))
            key = self.error_metric()
            entry["error"] = {**err, "tolerance": tol if math.isfinite(tol) else None, "metric": key}
            if err[key] > tol:
                raise VerificationError(
                    f"{self.name}: outputs differ from the original model by {key.replace('_', ' ')} {err[key]:.3g} "
                    f"(max rel {err['max_rel']:.3g}, max abs {err['max_abs']:.3g}), over the tolerance {tol:g}"
                )
        setattr(result, HISTORY_ATTR, [*past, entry])
        setattr(result, ORIGIN_ATTR, origin)
        return result
