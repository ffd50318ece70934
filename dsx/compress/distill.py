"""Knowledge distillation: ``dsx.distill`` / ``dsx.Distill`` train a student on a teacher's softened logits (plus
optional feature matching), and ``DistillationLoss`` is the same loss for users who run their own training loop.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from dsx.core.checks import check_flag, check_positive_int
from dsx.core.inputs import (
    Inputs, check_finite_parameters, check_module, model_device, normalize_inputs, tensor_leaves,
)
from dsx.core.transform import Transform, eval_mode

CONV_PROJECTIONS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


IGNORE_INDEX = -100
"""The label cross-entropy skips (Hugging Face pads labels with it)."""


def output_logits(out: Any, who: str) -> torch.Tensor:
    """The logits of a model output: ``out`` itself, its ``.logits`` (Hugging Face) or else its first tensor."""
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) and isinstance(out, Mapping):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor):
        logits = next(iter(tensor_leaves(out)), None)
    if logits is None:
        raise ValueError(f"{who}: the output ({type(out).__name__}) holds no tensor to distill")
    return logits


def _static_width(module: nn.Module) -> tuple[str, int] | None:
    """``(kind, width)`` of a module's output when its type tells: kind "last" (features on the last dim) or
    "conv<N>d" (channels on dim 1); None when it cannot be known before a forward pass."""
    if isinstance(module, nn.Linear):
        return "last", module.out_features
    if isinstance(module, nn.Embedding):
        return "last", module.embedding_dim
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.normalized_shape:
        return "last", module.normalized_shape[-1]
    if isinstance(module, nn.modules.conv._ConvNd) and len(module.kernel_size) in CONV_PROJECTIONS:
        return f"conv{len(module.kernel_size)}d", module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return "conv2d", module.num_features
    if isinstance(module, nn.BatchNorm3d):
        return "conv3d", module.num_features
    return None


def _projection(kind: str, width_in: int, width_out: int) -> nn.Module:
    if kind == "last":
        return nn.Linear(width_in, width_out)
    return CONV_PROJECTIONS[int(kind[4])](width_in, width_out, kernel_size=1)


def _projection_kind(student_shape: torch.Size, teacher_shape: torch.Size) -> str | None:
    """The projection that maps a student feature onto the teacher's shape: None when the shapes already match."""
    if student_shape == teacher_shape:
        return None
    ndim = len(student_shape)
    if ndim == len(teacher_shape) and ndim >= 1:
        differ = [i for i in range(ndim) if student_shape[i] != teacher_shape[i]]
        if differ == [ndim - 1]:
            return "last"
        if differ == [1] and ndim - 2 in CONV_PROJECTIONS:
            return f"conv{ndim - 2}d"
    return "mismatch"


def _check_layer(model: nn.Module, name: str, who: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f"did you mean {close}? " if close else ""
    raise ValueError(f"features: the {who} has no module named {name!r}; {hint}valid names include {valid[:8]}")


def _check_weights(temperature: Any, alpha: Any) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected a weight in [0, 1] (1 = distillation only, 0 = task loss only), "
                         f"got {alpha!r}")


def _check_features(features: Any) -> dict[str, str] | None:
    if features is None:
        return None
    if not isinstance(features, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in features.items()):
        raise ValueError(f"features: expected a dict of student layer name -> teacher layer name, got {features!r}")
    return dict(features)


class DistillationLoss(nn.Module):
    """Hinton distillation loss with optional feature matching, for your own training loop.

    ``loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * task_loss(s, target)
    + feature_weight * sum(MSE(project(student feature), teacher feature))``.

    The KL is summed over the last (class / vocabulary) dimension and averaged over every other position, so
    classifier logits ``[B, C]`` and token logits ``[B, T, V]`` both work; ``mask`` (shape ``logits.shape[:-1]``,
    e.g. an attention mask) restricts the average to the positions it marks. Outputs may be Hugging Face
    ``ModelOutput``-like objects: their ``.logits`` is used, else their first tensor. Without a ``target`` the
    task term is dropped. The task loss is ``loss_fn(student_logits, target)``; by default the student output's
    own ``.loss`` when it has one (a Hugging Face model called with ``labels``), else cross-entropy over the last
    dimension (class indices, -100 ignored, or probabilities of the logits' shape).

    ``features={"student.layer": "teacher.layer"}`` hooks those modules of ``student`` / ``teacher`` (given here)
    and matches their outputs (the first tensor of each) after each forward pass. When widths differ, a learned
    projection maps the student feature onto the teacher's: ``nn.Linear`` on the last dimension, or a 1x1
    convolution for channel-first conv features (``[N, C, H, W]``). Its parameters are this module's
    ``parameters()``: add them to your optimizer. Widths of linear, conv, embedding and norm layers are read
    here, so the projections exist right away; for other layers they are created at the first call (build the
    optimizer after it). Call ``remove_hooks()`` when done.

    Usage::

        crit = DistillationLoss(features={"body.2": "body.4"}, student=student, teacher=teacher)
        opt = torch.optim.AdamW([*student.parameters(), *crit.parameters()])
        with torch.no_grad():
            t_out = teacher(x)
        loss = crit(student(x), t_out, y)
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.7, loss_fn: Callable[..., torch.Tensor] | None = None,
                 features: Mapping[str, str] | None = None, student: nn.Module | None = None,
                 teacher: nn.Module | None = None, feature_weight: float = 1.0) -> None:
        super().__init__()
        _check_weights(temperature, alpha)
        if not isinstance(feature_weight, (int, float)) or isinstance(feature_weight, bool) or feature_weight < 0:
            raise ValueError(f"feature_weight: expected a non-negative number, got {feature_weight!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable (student_logits, target) -> loss, got {type(loss_fn)}")
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        self.loss_fn = loss_fn
        self.features = _check_features(features) or {}
        if self.features and (student is None or teacher is None):
            raise ValueError("features: pass the student and teacher modules (student=..., teacher=...) so their "
                             "layers can be hooked")
        self.projections = nn.ModuleDict()
        self._pending: set[str] = set()
        self._seen: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._handles: list[Any] = []
        for s_name, t_name in self.features.items():
            s_mod, t_mod = _check_layer(student, s_name, "student"), _check_layer(teacher, t_name, "teacher")
            s_width, t_width = _static_width(s_mod), _static_width(t_mod)
            if s_width is None or t_width is None or s_width[0] != t_width[0]:
                self._pending.add(s_name)
            elif s_width[1] != t_width[1]:
                param = next(s_mod.parameters(), None)
                proj = _projection(s_width[0], s_width[1], t_width[1])
                self.projections[self._key(s_name)] = proj if param is None else proj.to(param.device, param.dtype)
            self._handles.append(s_mod.register_forward_hook(self._hook("student", s_name)))
            self._handles.append(t_mod.register_forward_hook(self._hook("teacher", t_name)))

    @staticmethod
    def _key(student_layer: str) -> str:
        return student_layer.replace(".", "/") or "<root>"

    def _hook(self, side: str, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if (feature := next(iter(tensor_leaves(output)), None)) is not None:
                self._seen[side][name] = feature
        return hook

    def remove_hooks(self) -> None:
        """Detach the feature hooks from the student and teacher."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen = {"student": {}, "teacher": {}}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, feature_weight={self.feature_weight}"

    def kd_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``T^2 * KL(softmax(t / T) || softmax(s / T))``, summed over classes and averaged over positions."""
        t = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
        if mask is None:
            return kl.mean() * t * t
        mask = mask.to(kl.dtype)
        return (kl * mask).sum() / mask.sum().clamp_min(1) * t * t

    def task_loss(self, student_out: Any, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The supervised term: ``loss_fn``, else the output's own ``.loss``, else cross-entropy."""
        if self.loss_fn is not None:
            try:
                return self.loss_fn(student_logits, target)
            except Exception as e:
                raise ValueError(f"loss_fn: raised {type(e).__name__}: {e}") from e
        if isinstance(own := getattr(student_out, "loss", None), torch.Tensor):
            return own
        classes = student_logits.shape[-1]
        if target.is_floating_point() and target.shape == student_logits.shape:
            return F.cross_entropy(student_logits.reshape(-1, classes).float(), target.reshape(-1, classes).float())
        if target.is_floating_point() or target.shape != student_logits.shape[:-1]:
            raise ValueError(f"target: shape {tuple(target.shape)} ({target.dtype}) does not fit the student logits "
                             f"{tuple(student_logits.shape)}; expected class indices of shape "
                             f"{tuple(student_logits.shape[:-1])} or probabilities of the logits' shape "
                             "(or pass loss_fn)")
        labels = target[target != IGNORE_INDEX]  # -100 marks positions without a label (padding)
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < classes):
            raise ValueError(f"target: class indices must lie in [0, {classes}) (or be {IGNORE_INDEX}) for the "
                             f"student's {classes} logits, got values from {int(labels.min())} to {int(labels.max())}")
        return F.cross_entropy(student_logits.reshape(-1, classes).float(), target.reshape(-1))

    def feature_loss(self) -> torch.Tensor | None:
        """Sum of the MSEs between the (projected) student features and the teacher features of the last forward."""
        total = None
        for s_name, t_name in self.features.items():
            s_feat, t_feat = self._seen["student"].get(s_name), self._seen["teacher"].get(t_name)
            for side, name, feat in (("student", s_name, s_feat), ("teacher", t_name, t_feat)):
                if feat is None:
                    raise ValueError(f"features: the {side} module {name!r} did not run in the last forward pass; "
                                     f"run the {side} before computing the loss")
            key = self._key(s_name)
            if s_name in self._pending:
                kind = _projection_kind(s_feat.shape, t_feat.shape)
                if kind not in (None, "mismatch"):
                    width_in = s_feat.shape[-1] if kind == "last" else s_feat.shape[1]
                    width_out = t_feat.shape[-1] if kind == "last" else t_feat.shape[1]
                    self.projections[key] = _projection(kind, width_in, width_out).to(s_feat.device, s_feat.dtype)
                self._pending.discard(s_name)
            projected = self.projections[key](s_feat) if key in self.projections else s_feat
            if projected.shape != t_feat.shape:
                raise ValueError(
                    f"features[{s_name!r}]: the student feature of shape {tuple(s_feat.shape)} cannot be matched to "
                    f"the teacher feature {t_name!r} of shape {tuple(t_feat.shape)}; they may differ only in the last "
                    "dimension or, for channel-first conv features, in dim 1"
                )
            mse = F.mse_loss(projected.float(), t_feat.detach().float())
            total = mse if total is None else total + mse
        self._seen = {"student": {}, "teacher": {}}
        return total

    def forward(self, student_out: Any, teacher_out: Any, target: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        s = output_logits(student_out, "student")
        t = output_logits(teacher_out, "teacher")
        if s.shape != t.shape:
            raise ValueError(f"student output shape {tuple(s.shape)} and teacher output shape {tuple(t.shape)} "
                             "differ; distillation needs logits of the same shape (same classes / vocabulary)")
        if mask is not None and mask.shape != s.shape[:-1]:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the logits' positions "
                             f"{tuple(s.shape[:-1])}")
        if target is None and self.alpha == 0 and not self.features:
            raise ValueError("alpha=0 gives the distillation term no weight and no target was given: there is "
                             "nothing to learn; pass a target or use alpha > 0")
        loss = self.alpha * self.kd_loss(s, t, mask)
        if target is not None and self.alpha < 1:
            loss = loss + (1 - self.alpha) * self.task_loss(student_out, s, target)
        if (feature := self.feature_loss() if self.features else None) is not None:
            loss = loss + self.feature_weight * feature
        return loss


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _forward(who: str, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int) -> Any:
    """``model(*args, **kwargs)``; a failure becomes a ``ValueError`` naming ``who`` and the data batch."""
    try:
        return model(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        shapes = [tuple(x.shape) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        raise ValueError(f"{who}: raised {type(e).__name__} on data batch {index} (tensor shapes {shapes}): "
                         f"{e}") from e


def _to(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, tree)


def split_batch(batch: Any, index: int) -> tuple[Inputs, torch.Tensor | None]:
    """``((args, kwargs), target)`` of a training batch: a Tensor x, an ``(x, y)`` pair (``x`` a Tensor, a tuple of
    args or a dict of kwargs) or a dict of keyword inputs whose optional ``"labels"`` is the target."""
    name = f"data: batch {index}"
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        target = kwargs.pop("labels", None)
        return normalize_inputs(kwargs, name=name), target
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        target = batch[1] if len(batch) == 2 else None
        if target is not None and not isinstance(target, torch.Tensor):
            raise ValueError(f"{name}: the target (second item) must be a Tensor or None, got {type(target).__name__}")
        return normalize_inputs(batch[0], name=name), target
    if isinstance(batch, torch.Tensor):
        return normalize_inputs(batch, name=name), None
    what = f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list)) else \
        f"a {type(batch).__name__}"
    raise ValueError(f"{name} is {what}; expected a Tensor x, an (x, y) pair or a dict of keyword inputs "
                     "(with an optional 'labels')")


@dataclass
class Distill(Transform):
    """Train the model (the student) to match ``teacher`` on ``data``: KL on temperature-softened logits, the task
    loss on the targets, and optional feature matching (see ``DistillationLoss`` for the loss).

    ``data`` is re-iterated each epoch (a list or a DataLoader; a generator only for ``epochs=1``); a batch is a
    Tensor x (distillation only), an ``(x, y)`` pair, or a dict of keyword inputs (Hugging Face style) whose
    ``"labels"`` is the target: it is passed to the student when its ``forward`` takes ``labels`` (so its own
    ``.loss``, with the model's shifting and ignore index, is the task loss) and never to the teacher. The
    teacher runs in eval mode under ``torch.no_grad`` (its modes and device are restored afterwards); the
    student trains in train mode and is returned in the modes it came in. ``optimizer`` is None (AdamW with
    ``lr``), a callable ``params -> optimizer``, or a ready optimizer over the student's parameters (rebound to
    the copy unless ``inplace``; the projections' parameters are added as a new param group). ``device`` moves
    the student, teacher and batches (default: the student's device).

    After the call, ``losses`` holds the per-step losses; the history info records the epochs, steps, final loss
    and per-epoch mean losses. Verification: distillation changes the outputs by design, so with example inputs
    the result is only checked to keep the output shapes and finiteness (``tolerance_for`` is infinite). Replay
    (``dsx.load``) does nothing: the trained weights come from the file. Only the JSON-able settings (epochs,
    temperature, alpha, features, lr, feature_weight) are recorded; teacher, data, optimizer and loss_fn are not.
    """

    name = "distill"
    stage = "distill"

    teacher: nn.Module | None = field(default=None, compare=False)
    data: Any = field(default=None, compare=False)
    epochs: int = 1
    temperature: float = 4.0
    alpha: float = 0.7
    features: dict[str, str] | None = None
    optimizer: Any = field(default=None, compare=False)
    loss_fn: Callable[..., torch.Tensor] | None = field(default=None, compare=False)
    device: Any = None
    progress: bool = True
    lr: float = 1e-3
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_weights(self.temperature, self.alpha)
        self.features = _check_features(self.features)
        check_positive_int("epochs", self.epochs)
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if self.teacher is not None:
            check_module(self.teacher, "teacher")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn: expected a callable (student_logits, target) -> loss, got {self.loss_fn!r}")
        check_flag("progress", self.progress)
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {self.device!r}") \
                    from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device: {self.device!r} is not available (torch.cuda.is_available() is False)")
        if self.optimizer is not None and not (isinstance(self.optimizer, torch.optim.Optimizer)
                                               or callable(self.optimizer)):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer or a callable params -> optimizer, got "
                            f"{type(self.optimizer).__name__}")
        self.losses: list[float] = []
        self._source: nn.Module | None = None

    def __repr__(self) -> str:
        return f"Distill({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def config(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "temperature": self.temperature, "alpha": self.alpha,
                "features": self.features, "lr": self.lr, "feature_weight": self.feature_weight}

    def tolerance_for(self, dtype: torch.dtype) -> float:
        return math.inf

    def __call__(self, model: nn.Module, example_inputs: Any = None) -> nn.Module:
        self._source = model
        try:
            return super().__call__(model, example_inputs)
        finally:
            self._source = None

    def _check_data(self) -> None:
        data = self.data
        if data is None:
            raise ValueError("data: distillation needs training data (a list or DataLoader of batches)")
        if isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
            hint = "; wrap a single batch in a list: [batch]" if isinstance(data, (torch.Tensor, Mapping)) else ""
            raise TypeError(f"data: expected an iterable of batches (a list, a DataLoader), got "
                            f"{type(data).__name__}{hint}")
        if isinstance(data, Iterator) and self.epochs > 1:
            raise ValueError(f"data: a one-shot iterator ({type(data).__name__}) can be read only once, but "
                             f"epochs={self.epochs}; pass a list or a DataLoader")

    def _rebind(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """``optimizer`` over ``model``'s parameters: itself, or (for the copy of the caller's student) a deep copy
        whose parameters and state are remapped to the copy."""
        held = [p for group in optimizer.param_groups for p in group["params"]]
        own = {id(p) for p in model.parameters()}
        if all(id(p) in own for p in held):
            return optimizer
        if self._source is not None and self._source is not model:
            copies = dict(model.named_parameters())
            memo = {id(p): copies[n] for n, p in self._source.named_parameters()}
            if all(id(p) in memo for p in held):
                return copy.deepcopy(optimizer, memo)
        raise ValueError("optimizer: the ready optimizer holds parameters that are not the student's; build it "
                         "over the student's parameters, or pass a callable params -> optimizer "
                         "(e.g. lambda params: torch.optim.SGD(params, lr=0.1))")

    def _optimizer(self, model: nn.Module, criterion: DistillationLoss) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        extra = [p for p in criterion.parameters() if p.requires_grad]
        if not params:
            raise ValueError("distill: the student has no trainable parameters (all have requires_grad=False)")
        if self.optimizer is None:
            return torch.optim.AdamW(params + extra, lr=self.lr)
        if isinstance(self.optimizer, torch.optim.Optimizer):
            optimizer = self._rebind(self.optimizer, model)
            if extra:
                optimizer.add_param_group({"params": extra})
            return optimizer
        optimizer = self.optimizer(params + extra)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: the callable returned a {type(optimizer).__name__}, not a "
                            "torch.optim.Optimizer")
        return optimizer

    def apply(self, model: nn.Module, inputs: Inputs | None) -> tuple[nn.Module, dict[str, Any]]:
        if self.replay:
            return model, {}
        if self.teacher is None:
            raise ValueError("teacher: distillation needs a teacher model")
        teacher = self.teacher
        check_finite_parameters(teacher, "teacher")
        self._check_data()
        device = torch.device(self.device) if self.device is not None else model_device(model)
        teacher_device = model_device(teacher)
        model.to(device)
        teacher.to(device)
        criterion = DistillationLoss(self.temperature, self.alpha, self.loss_fn, self.features, student=model,
                                     teacher=teacher, feature_weight=self.feature_weight).to(device)
        labels_to_student = self.loss_fn is None and _accepts(model, "labels")
        modes = [(m, m.training) for m in model.modules()]
        try:
            total = self.epochs * len(self.data)
        except TypeError:
            total = None
        bar = tqdm(total=total, desc="dsx distill", disable=not self.progress, leave=False)
        optimizer: torch.optim.Optimizer | None = None
        self.losses = []
        epoch_means: list[float] = []
        model.train()
        try:
            with eval_mode(teacher):
                for epoch in range(self.epochs):
                    seen, running = 0, 0.0
                    for index, batch in enumerate(self.data):
                        (args, kwargs), target = _to(split_batch(batch, index), device)
                        with torch.no_grad():
                            teacher_out = _forward("teacher", teacher, args, kwargs, index)
                        extra = {"labels": target} if (labels_to_student and target is not None
                                                       and isinstance(batch, Mapping)) else {}
                        student_out = _forward("student", model, args, {**kwargs, **extra}, index)
                        mask = kwargs.get("attention_mask")
                        if not (isinstance(mask, torch.Tensor)
                                and mask.shape == output_logits(student_out, "student").shape[:-1]):
                            mask = None
                        loss = criterion(student_out, teacher_out, target, mask=mask)
                        value = loss.item()
                        step = len(self.losses) + 1
                        if not math.isfinite(value):
                            raise ValueError(f"distill: the loss is {value} at step {step} (epoch {epoch + 1}, "
                                             f"batch {index}); lower lr, check the data for NaN/inf or lower the "
                                             "temperature")
                        if optimizer is None:
                            optimizer = self._optimizer(model, criterion)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        self.losses.append(value)
                        seen, running = seen + 1, running + value
                        bar.update(1)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.4f}", refresh=False)
                    if seen == 0:
                        raise ValueError("data: no batches; pass at least one batch" if epoch == 0 else
                                         f"data: no batches in epoch {epoch + 1}; data must yield its batches "
                                         "again each epoch (a list or a DataLoader)")
                    epoch_means.append(running / seen)
        finally:
            bar.close()
            criterion.remove_hooks()
            for m, training in modes:
                m.training = training
            if model_device(teacher) != teacher_device:
                teacher.to(teacher_device)
        info = {"epochs": self.epochs, "steps": len(self.losses), "final_loss": self.losses[-1],
                "epoch_losses": epoch_means, "projections": sorted(criterion.projections), "device": str(device)}
        return model, info


def distill(teacher: nn.Module, student: nn.Module, data: Iterable[Any], *, epochs: int = 1,
            temperature: float = 4.0, alpha: float = 0.7, features: Mapping[str, str] | None = None,
            optimizer: torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
            loss_fn: Callable[..., torch.Tensor] | None = None, device: torch.device | str | None = None,
            progress: bool = True, lr: float = 1e-3, feature_weight: float = 1.0,
            inplace: bool = False) -> tuple[nn.Module, list[float]]:
    """Train ``student`` to match ``teacher`` on ``data`` (``dsx.Distill(teacher, data, ...)(student)``).

    Args:
        teacher: the reference model (run in eval mode, without gradients).
        student: the model to train (a copy unless ``inplace``).
        data: batches (a tensor, an ``(x, y)`` pair or a dict of keyword inputs with optional ``"labels"``),
            re-iterated each epoch.
        epochs: passes over ``data``.
        temperature: the softmax temperature of the KL term.
        alpha: the weight of the KL term against the task loss.
        features: ``{"student.layer": "teacher.layer"}`` feature maps to match (projected when widths differ).
        optimizer: None (AdamW with ``lr``), a callable ``params -> optimizer`` or an optimizer.
        loss_fn: the task loss ``loss_fn(student_logits, target)``.
        device: where student, teacher and batches run (default: the student's device).
        progress: show a progress bar.
        lr: AdamW's learning rate when ``optimizer`` is None.
        feature_weight: the weight of the feature-matching term.
        inplace: train ``student`` itself.

    Returns:
        ``(trained student, per-step losses)``; the history info records the per-epoch means.

    Raises:
        ValueError / TypeError: a bad argument, named in the message.

    Example:
        >>> student, losses = dsx.distill(teacher, student, loader, epochs=2, temperature=4.0)
    """
    check_module(student, "student")
    step = Distill(teacher, data, epochs=epochs, temperature=temperature, alpha=alpha, features=features,
                   optimizer=optimizer, loss_fn=loss_fn, device=device, progress=progress, lr=lr,
                   feature_weight=feature_weight, inplace=inplace)
    return step(student), step.losses
