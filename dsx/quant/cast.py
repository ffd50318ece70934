"""Run a model's float layers in bf16 / fp16 while its quantized layers keep their integer weights and fp32 scales.

The root gets hooks that cast float inputs to the compute dtype and float outputs back, so callers see no change.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from dsx.quant.embedding import QuantizedEmbedding
from dsx.quant.linear import QuantLinear

CAST_ATTR = "_dsx_compute_dtype"


def _cast_tree(tree: Any, src: tuple[torch.dtype, ...], dst: torch.dtype) -> Any:
    return pytree.tree_map(lambda x: x.to(dst) if isinstance(x, torch.Tensor) and x.dtype in src else x, tree)


FULL = (torch.float32, torch.float64)


def _cast_inputs(dtype: torch.dtype, src: tuple[torch.dtype, ...], module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return _cast_tree(args, src, dtype), _cast_tree(kwargs, src, dtype)


def _cast_outputs(dtype: torch.dtype, back: torch.dtype, module: nn.Module, args: Any, kwargs: Any,
                  output: Any) -> Any:
    return _cast_tree(output, (dtype,), back)


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype ``cast_float`` made ``model`` compute in, None when it was not cast."""
    return getattr(model, CAST_ATTR, None)


def cast_float(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every float parameter and buffer of ``model`` to ``dtype``, except quantized layers' scales, in place.

    Args:
        model: the model (already quantized or not); modified in place.
        dtype: ``torch.bfloat16`` or ``torch.float16``.

    Returns:
        ``model``, whose forward takes and returns what it did before (float inputs are cast to ``dtype``, outputs
        in ``dtype`` back to the model's float dtype).

    Raises:
        ValueError: ``dtype`` is not bf16 / fp16, or ``model`` was already cast.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.bfloat16 or torch.float16, got {dtype!r}")
    if compute_dtype(model) is not None:
        raise ValueError(f"dtype: the model already computes in {compute_dtype(model)}; cast the original model")
    floats = [t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()
              and t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)]
    back = max(set(floats), key=floats.count, default=torch.float32)
    for m in model.modules():
        if isinstance(m, QuantizedEmbedding):
            m.dtype = dtype
            continue
        for name, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is None or not t.is_floating_point() or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                continue
            if isinstance(m, QuantLinear) and name != "bias":
                continue  # scales stay fp32
            if name in m._parameters:
                t.data = t.data.to(dtype)
            else:
                m._buffers[name] = t.to(dtype)
    src = tuple({*FULL, back} - {dtype})  # what callers pass: full precision, or the model's own dtype
    model.register_forward_pre_hook(functools.partial(_cast_inputs, dtype, src), with_kwargs=True)
    model.register_forward_hook(functools.partial(_cast_outputs, dtype, back), with_kwargs=True)
    setattr(model, CAST_ATTR, dtype)
    return model
