"""What the ``dsx`` command works on: a model from ``package.module:factory``, a Hugging Face folder or a ``.pt2``
program, and its inputs. Models are built by calling user code or loading safetensors / an exported program, never
by unpickling a whole-model file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from dsx.core.inputs import check_module, normalize_inputs
from dsx.pretrained import TASKS, from_pretrained, hf_example_inputs, is_hf_folder


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,32,32"`` -> ``(2, 3, 32, 32)`` (argparse type of ``--input-shape``: bad text is a usage error)."""
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected positive sizes separated by commas, "
                                         "e.g. 2,3,32,32")
    return shape


def parse_dtype(name: str) -> torch.dtype:
    """A torch dtype by name, e.g. ``float32``, ``bfloat16``, ``int64`` (argparse type of ``--input-dtype``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}: use a torch dtype name such as float32 or int64")
    return dtype


def load_factory(spec: str, *, what: str = "MODEL") -> Callable[[], Any]:
    """The callable that ``package.module:factory`` names (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(f"{what} {spec!r}: expected package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{what} {spec!r}: {attr!r} is not callable (it is a {type(obj).__name__})")
    return obj


def call_factory(spec: str, *, what: str = "MODEL") -> Any:
    """Call the factory ``spec`` names; an exception inside it becomes a ``ValueError`` naming the factory."""
    factory = load_factory(spec, what=what)
    try:
        return factory()
    except Exception as e:
        raise ValueError(f"{what} {spec!r}: the factory raised {type(e).__name__}: {e}") from e


def load_model(spec: str, task: str = "auto") -> nn.Module:
    """The eval-mode module a MODEL argument names: ``package.module:factory`` (called), a Hugging Face folder
    (``config.json`` + safetensors, or a dsx save of such a model; ``task`` picks the head) or a ``.pt2``
    program."""
    if is_hf_folder(spec):
        return from_pretrained(spec, task=task)
    if spec.endswith(".pt2"):
        from dsx.export.pt2 import load_pt2

        return load_pt2(spec)
    if ":" not in spec:
        raise ValueError(f"MODEL {spec!r}: expected package.module:factory, a Hugging Face model folder (with "
                         "config.json) or a .pt2 file")
    model = call_factory(spec)
    check_module(model, f"MODEL {spec!r} (what the factory returned)")
    return model.eval()


def random_inputs(shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype] = (), *, high: int = 100,
                  seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One random tensor per shape: standard normal for floating dtypes, ``randint(0, high)`` for the others.

    ``dtypes`` holds one dtype per shape, one for all, or none (float32).
    """
    if len(dtypes) not in (0, 1, len(shapes)):
        raise ValueError(f"--input-dtype: give one dtype for all inputs or one per --input-shape ({len(shapes)}), "
                         f"got {len(dtypes)}")
    if high < 1:
        raise ValueError(f"--input-high: must be >= 1, got {high}")
    dtypes = list(dtypes or [torch.float32]) * (len(shapes) if len(dtypes) <= 1 else 1)
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=gen).to(d) if d.is_floating_point
                 else torch.randint(0, 2 if d == torch.bool else high, tuple(s), generator=gen).to(d)
                 for s, d in zip(shapes, dtypes))


def load_inputs(spec: str) -> Any:
    """The example inputs an inputs factory (``package.module:factory``) returns: a Tensor, tuple or dict."""
    inputs = call_factory(spec, what="--inputs")
    normalize_inputs(inputs, name=f"--inputs {spec!r} (what the factory returned)")
    return inputs


def example_inputs(*, shapes: Sequence[Sequence[int]] | None = None, dtypes: Sequence[torch.dtype] | None = None,
                   high: int = 100, factory: str | None = None) -> Any:
    """Example inputs from either ``--input-shape`` (+ ``--input-dtype``) or an ``--inputs`` factory."""
    if factory and (shapes or dtypes):
        raise ValueError("--inputs cannot be combined with --input-shape / --input-dtype")
    if factory:
        return load_inputs(factory)
    if not shapes:
        raise ValueError("the model needs example inputs: pass --input-shape (e.g. 2,3,32,32, once per positional "
                         "input) or --inputs package.module:factory")
    return random_inputs(shapes, dtypes or (), high=high)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The MODEL positional and the example-input options shared by ``optimize``, ``export`` and ``bench``."""
    parser.add_argument("model", metavar="MODEL", help="package.module:factory (a callable returning the nn.Module), "
                                                       "a Hugging Face model folder or a .pt2 file")
    parser.add_argument("--task", choices=sorted(TASKS), default="auto",
                        help="with a Hugging Face folder: the head to load (default: the class config.json names)")
    parser.add_argument("--input-shape", type=parse_shape, action="append", metavar="D0,D1,...",
                        help="shape of a random positional input; repeat for several inputs")
    parser.add_argument("--input-dtype", type=parse_dtype, action="append", metavar="DTYPE",
                        help="dtype of the inputs (one for all, or one per --input-shape); default float32")
    parser.add_argument("--input-high", type=int, default=100, metavar="HIGH",
                        help="integer inputs are drawn from [0, HIGH) (default 100)")
    parser.add_argument("--inputs", metavar="package.module:factory",
                        help="a callable returning the example inputs (a Tensor, tuple or dict)")


def model_and_inputs(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The model and example inputs the parsed ``add_model_arguments`` options describe (a Hugging Face folder
    without input options gets inputs built from its config)."""
    if is_hf_folder(args.model) and not (args.input_shape or args.input_dtype or args.inputs):
        model = load_model(args.model, args.task)
        return model, hf_example_inputs(model)
    inputs = example_inputs(shapes=args.input_shape, dtypes=args.input_dtype, high=args.input_high,
                            factory=args.inputs)
    return load_model(args.model, args.task), inputs

