"""Calibration for static quantization: validate the calibration batches, run the model on them, and observe
the input range of chosen modules through forward pre-hooks (the hooks and training modes are always restored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from dsx.core.inputs import MAX_BATCHES, Inputs, check_module, model_device, run_model, take_batches
from dsx.quant.observers import ChannelAbsMax, Observer, make_observer


@dataclass
class Observers:
    """What calibration saw at one module's first positional input: its range, and optionally per-channel max.

    A module never called on the calibration data keeps empty observers (``activation.count == 0``).
    """

    activation: Observer
    channel_absmax: ChannelAbsMax | None = None


def check_batches(data: Any, *, allow_empty: bool = False, max_batches: int = MAX_BATCHES) -> list[Inputs]:
    """The calibration batches as ``(args, kwargs)`` pairs, after checking them all.

    ``data`` is an iterable (a list, a generator, a DataLoader) of batches, each a Tensor, a tuple/list of
    positional inputs or a dict of keyword inputs. Raises ``TypeError`` if ``data`` is not such an iterable or a
    batch has an unsupported form, ``ValueError`` if a floating input holds NaN or inf, or if it is empty (unless
    ``allow_empty``: one rank of a distributed calibration may hold no batches). At most ``MAX_BATCHES`` are read
    (a warning says when there were more), so an endless iterator cannot hang calibration.
    """
    if isinstance(data, (torch.Tensor, dict, str, bytes)) or not isinstance(data, Iterable):
        hint = "; wrap a single batch in a list: [batch]" if isinstance(data, (torch.Tensor, dict)) else ""
        raise TypeError(
            f"calibration data: expected an iterable of batches (a list, a generator, a DataLoader), "
            f"got {type(data).__name__}{hint}"
        )
    batches = take_batches(data, max_batches=max_batches)
    if not batches and not allow_empty:
        raise ValueError("calibration: the calibration data is empty; pass at least one batch")
    return batches


def _check_modules(model: nn.Module, modules: Any) -> dict[str, nn.Module]:
    if not isinstance(modules, dict):
        raise TypeError(f"modules: expected a dict of name -> nn.Module, got {type(modules).__name__}")
    if not modules:
        raise ValueError("modules: expected at least one module to observe, got an empty dict")
    members = {id(m) for m in model.modules()}
    for name, module in modules.items():
        if not isinstance(name, str) or not isinstance(module, nn.Module):
            raise TypeError(f"modules: expected str names and nn.Module values, got {name!r}: "
                            f"{type(module).__name__}")
        if id(module) not in members:
            raise ValueError(f"modules[{name!r}]: not a submodule of the model")
    return modules


def observe_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Any],
    observer: str = "minmax",
    *,
    channel_absmax: bool = False,
    progress: bool = True,
    **observer_kwargs: Any,
) -> dict[str, Observers]:
    """Run ``model`` (eval mode, no grad) on every calibration batch and observe each named module's input.

    One ``observer`` (a name from ``dsx.quant.observers.OBSERVERS``, built with ``observer_kwargs``) per module
    sees the module's first positional input on every call; ``channel_absmax=True`` also records its per-channel
    max ``|x|`` (last dimension) for SmoothQuant. Tensors in the batches are moved to the model's device. The
    hooks are removed and every submodule's training flag is restored, even when a batch fails.
    """
    check_module(model)
    modules = _check_modules(model, modules)
    stats = {
        name: Observers(make_observer(observer, **observer_kwargs), ChannelAbsMax() if channel_absmax else None)
        for name in modules
    }
    data = check_batches(batches)
    device = model_device(model)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                got = f"a {x.dtype} Tensor" if isinstance(x, torch.Tensor) else type(x).__name__
                raise TypeError(f"calibration: module {name!r}: expected a floating-point Tensor as its first "
                                f"positional input, got {got}")
            stats[name].activation.update(x)
            if stats[name].channel_absmax is not None:
                stats[name].channel_absmax.update(x)

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    try:
        model.eval()
        for i, inputs in enumerate(tqdm(data, desc="dsx calibrate", disable=not progress, leave=False)):
            inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), inputs)
            run_model(model, inputs, name=f"calibration batch {i}")
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return stats
