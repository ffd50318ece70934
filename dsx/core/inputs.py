"""Example inputs: normalize the forms users pass, run a model on them, and describe them for replay.

Accepted forms: a Tensor, a tuple/list of positional arguments, or a dict of keyword arguments.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def normalize_inputs(example_inputs: Any, *, name: str = "example_inputs") -> Inputs:
    """Return ``(args, kwargs)`` for a Tensor, a tuple/list of args, or a dict of kwargs.

    Raises:
        TypeError: another type, dict keys that are not names, or no tensor at all.
        ValueError: a floating tensor holding NaN or inf.
    """
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, dict):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError(f"{name}: dict keys must be argument names (str)")
        args, kwargs = (), dict(example_inputs)
    else:
        raise TypeError(
            f"{name}: expected a Tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
            f"got {type(example_inputs).__name__}"
        )
    if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves((args, kwargs))):
        raise TypeError(f"{name}: must contain at least one Tensor")
    check_finite((args, kwargs), name)
    return args, kwargs


def check_finite(inputs: Inputs, name: str) -> None:
    """Raise ``ValueError`` naming the first floating input of ``(args, kwargs)`` that holds NaN or inf: an error
    measured on such inputs compares nothing."""
    args, kwargs = inputs
    for prefix, tree in (("args", args), ("kwargs", kwargs)):
        for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(leaf.isfinite().all()):
                bad = int((~leaf.isfinite()).sum())
                raise ValueError(f"{name}: input {prefix}{pytree.keystr(path)} contains NaN or inf ({bad} of "
                                 f"{leaf.numel()} values); pass finite inputs")


def check_finite_parameters(model: nn.Module, name: str = "model") -> None:
    """Raise ``ValueError`` naming the first parameter of ``model`` that holds NaN or inf."""
    for pname, p in model.named_parameters():
        if p.is_floating_point() and not bool(p.detach().isfinite().all()):
            raise ValueError(f"{name}: parameter {pname!r} contains NaN or inf ({int((~p.isfinite()).sum())} of "
                             f"{p.numel()} values); dsx transforms need finite weights")


MAX_BATCHES = 256
"""How many batches a calibration or importance pass reads from an iterable at most (an endless iterator stops)."""


def take_batches(data: Iterable[Any], *, name: str = "calibration", max_batches: int = MAX_BATCHES) -> list[Inputs]:
    """The first ``max_batches`` batches of ``data``, each normalized (and checked finite) like example inputs; a
    warning when ``data`` held more.

    Raises:
        TypeError: a batch of an unsupported form.
        ValueError: a batch holding NaN or inf.
    """
    if isinstance(data, (torch.Tensor, dict, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"{name}: expected an iterable of batches (a list, a generator, a DataLoader), got "
                        f"{type(data).__name__}")
    batches: list[Inputs] = []
    for i, batch in enumerate(data):
        if i == max_batches:
            warnings.warn(f"{name}: read the first {max_batches} batches and stopped (the data holds more, or is "
                          "endless)", stacklevel=3)
            break
        batches.append(normalize_inputs(batch, name=f"{name} batch {i}"))
    return batches


def check_module(model: Any, name: str = "model") -> nn.Module:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Tensors in a nested output (tuples, lists, dicts, Hugging Face ModelOutputs), in order."""
    found: list[torch.Tensor] = []
    for leaf in pytree.tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif isinstance(leaf, Mapping):
            found.extend(tensor_leaves(list(leaf.values())))
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            found.extend(tensor_leaves([getattr(leaf, f.name) for f in dataclasses.fields(leaf)]))
    return found


def run_model(model: nn.Module, inputs: Inputs, *, name: str = "example_inputs") -> Any:
    """Call ``model(*args, **kwargs)`` without grad; a failure becomes a ``ValueError`` naming the inputs."""
    args, kwargs = inputs
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as e:
        shapes = [tuple(x.shape) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        raise ValueError(
            f"{name}: the model raised {type(e).__name__} on the example inputs (tensor shapes {shapes}): {e}"
        ) from e


def describe(inputs: Inputs) -> dict[str, Any]:
    """A JSON-able spec (shapes, dtypes, python leaves) from which ``synthesize`` rebuilds same-shaped inputs."""
    leaves, spec = pytree.tree_flatten(inputs)
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            out.append({"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")})
        elif x is None or isinstance(x, (bool, int, float, str)):
            out.append({"value": x})
        else:
            raise TypeError(f"example_inputs: cannot record an input of type {type(x).__name__}")
    return {"leaves": out, "tree": pytree.treespec_dumps(spec)}


MAX_SYNTHESIZED = 1 << 28
"""The most elements one synthesized input may hold (1 GiB of fp32)."""


def synthesize(desc: dict[str, Any], device: torch.device | str = "cpu") -> Inputs:
    """Inputs matching a ``describe`` spec: zeros for integer/bool tensors, standard normal for floats.

    Raises:
        ValueError: a spec (read from a file) naming something other than a torch dtype, a shape that is not a list
            of sizes, or more than ``MAX_SYNTHESIZED`` elements.
    """
    gen = torch.Generator().manual_seed(0)
    leaves = []
    for leaf in desc["leaves"]:
        if "value" in leaf:
            leaves.append(leaf["value"])
            continue
        dtype, shape = getattr(torch, str(leaf.get("dtype")), None), leaf.get("shape")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"inputs: {leaf.get('dtype')!r} is not a torch dtype")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"inputs: shape {shape!r} is not a list of non-negative sizes")
        if math.prod(shape) > MAX_SYNTHESIZED:
            raise ValueError(f"inputs: shape {shape} has more than {MAX_SYNTHESIZED} elements")
        if dtype.is_floating_point:
            t = torch.randn(leaf["shape"], generator=gen).to(dtype)
        else:
            t = torch.zeros(leaf["shape"], dtype=dtype)
        leaves.append(t.to(device))
    args, kwargs = pytree.tree_unflatten(leaves, pytree.treespec_loads(desc["tree"]))
    return tuple(args), dict(kwargs)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless module)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")
