"""``export(model, example_inputs, path)``: write a model as ONNX, a ``.pt2`` program or a TensorRT engine,
picking the format from the file suffix, and verify the file against PyTorch.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import torch.nn as nn

from dsx.core.checks import check_flag, check_path
from dsx.core.inputs import check_module, normalize_inputs
from dsx.export.result import ExportResult

SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".engine": "tensorrt", ".ts": "tensorrt"}
FORMATS = ("onnx", "pt2", "tensorrt")


def export_format(path: Path, format: str | None = None) -> str:
    """The export format for ``path``: ``format`` if given (it must agree with a known suffix), else the suffix's."""
    known = SUFFIXES.get(path.suffix)
    if format is None:
        if known is None:
            raise ValueError(f"path: cannot tell the export format of {str(path)!r} from its suffix; use one of "
                             f"{sorted(SUFFIXES)} or pass format= one of {FORMATS}")
        return known
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    if known is not None and known != format:
        raise ValueError(f"path: {str(path)!r} has the {known} suffix {path.suffix!r}, but format={format!r}")
    return format


def export(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, format: str | None = None,
           dynamic_shapes: Any = None, opset: int | None = None, verify: bool = True,
           precision: str | None = None, kv_cache: bool = False) -> ExportResult:
    """Export ``model`` traced on ``example_inputs`` to ``path`` and return what was written and how close it is.

    The format comes from ``format`` (``"onnx"``, ``"pt2"``, ``"tensorrt"``) or the suffix: ``.onnx`` (run in
    onnxruntime to verify), ``.pt2`` (a ``torch.export`` program, reload with ``dsx.export.pt2.load_pt2``),
    ``.engine`` / ``.ts`` (TensorRT; needs a CUDA GPU and ``torch_tensorrt``). ``dynamic_shapes`` is a
    torch.export spec or ``"batch"`` (dim 0 of every input dynamic). ``opset`` applies to ONNX only and
    ``precision`` (``"fp32"``, ``"fp16"``, ``"int8"``) to TensorRT only. ``verify=True`` runs the written file
    on the example inputs and raises ``dsx.VerificationError`` when it drifts from the model.
    A Hugging Face decoder exports without its KV cache by default; ``kv_cache=True`` (ONNX only) writes it
    "with past" (``past_key_values.*`` inputs, ``present.*`` outputs, see ``dsx.export.decoder``) and verifies it
    by greedy decoding from the example prompt in onnxruntime.

    Args:
        model: the model to export (dsx-quantized models included).
        example_inputs: a tensor, a tuple of tensors, or ``(args, kwargs)`` to trace on.
        path: the file to write (``.onnx``, ``.pt2``, ``.engine`` / ``.ts``).
        format: ``"onnx"``, ``"pt2"`` or ``"tensorrt"``; None reads it from the suffix.
        dynamic_shapes: a ``torch.export`` spec or ``"batch"``.
        opset: the ONNX opset (ONNX only).
        verify: run the written file on the example inputs and compare.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (TensorRT only).
        kv_cache: export a decoder with its KV cache (ONNX only).

    Returns:
        An ``ExportResult``: the path, format, measured errors and notes on what was done.

    Raises:
        ValueError / TypeError: a bad argument, a format the model cannot take, or a missing exporter (with the
            install hint).
        dsx.VerificationError: the written file's outputs drift beyond the tolerance.

    Example:
        >>> result = dsx.export(model, x, "model.onnx", dynamic_shapes="batch")
        >>> result.max_rel
    """
    check_module(model)
    normalize_inputs(example_inputs)
    path = check_path("path", path, directory=False)
    check_flag("verify", verify)
    check_flag("kv_cache", kv_cache)
    fmt = export_format(path, format)
    if kv_cache and fmt != "onnx":
        raise ValueError(f"kv_cache: only the onnx format exports a decoder with its KV cache, not {fmt}")
    if opset is not None and fmt != "onnx":
        raise ValueError(f"opset: only the onnx format takes an opset, not {fmt}")
    if precision is not None and fmt != "tensorrt":
        raise ValueError(f"precision: only the tensorrt format (.engine / .ts) takes a precision, not {fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kv_cache:
        from dsx.export.decoder import export_decoder_onnx

        return export_decoder_onnx(model, example_inputs, path, dynamic_shapes=dynamic_shapes, opset=opset,
                                   verify=verify)
    if fmt == "onnx":
        from dsx.export.onnx import export_onnx

        return export_onnx(model, example_inputs, path, dynamic_shapes=dynamic_shapes, opset=opset, verify=verify)
    if fmt == "pt2":
        from dsx.export.pt2 import export_pt2

        return export_pt2(model, example_inputs, path, dynamic_shapes=dynamic_shapes, verify=verify)
    from dsx.export.tensorrt import export_tensorrt

    return export_tensorrt(model, example_inputs, path, precision=precision, dynamic_shapes=dynamic_shapes,
                           verify=verify)


class _CallableModule(types.ModuleType):
    """Lets ``dsx.export(...)`` call :func:`export` while ``dsx.export.onnx`` etc. stay importable submodules."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
