"""Export a model to TensorRT through ``torch_tensorrt`` (dynamo IR): a ``.ts`` / exported-program file or a raw
``.engine``, verified on the GPU. Needs an NVIDIA GPU, CUDA and the TensorRT libraries (``pip install "dsx[trt]"``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from dsx.core.inputs import check_module, normalize_inputs, run_model, tensor_leaves
from dsx.core.transform import VerificationError, compare_outputs
from dsx.export.result import ExportResult, check_error
from dsx.graph.capture import batch_dynamic_shapes

PRECISIONS = ("fp32", "fp16", "int8")
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}
INSTALL_HINT = 'pip install "dsx[trt]" (the torch-tensorrt release matching your torch version)'
DEVICE = "cuda"


def check_precision(precision: str | None) -> str:
    """``precision`` as one of ``fp32`` / ``fp16`` (None means fp32); ``ValueError`` for anything else."""
    if precision is None:
        return "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {(None, *PRECISIONS)}, got {precision!r}")
    if precision == "int8":
        raise ValueError("precision: int8 TensorRT needs calibrated scales, i.e. a model quantized by dsx.quantize "
                         "first, which is not available yet; use precision='fp16' or 'fp32'")
    return precision


def _torch_tensorrt() -> Any:
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT export needs a CUDA GPU, and torch.cuda.is_available() is False: run on a "
                           f"machine with an NVIDIA GPU and a CUDA build of torch, with {INSTALL_HINT}")
    try:
        import torch_tensorrt
    except ImportError as e:
        raise RuntimeError(f"TensorRT export needs torch_tensorrt, which is not installed ({e}): {INSTALL_HINT}; "
                           "it needs an NVIDIA GPU with the TensorRT libraries") from e
    return torch_tensorrt


def _to(x: Any, device: str, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)
    return x


def _run_engine(data: bytes, named: dict[str, Any]) -> list[torch.Tensor]:
    """Run a serialized TensorRT engine on CUDA tensors looked up by the engine's input names."""
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    missing = [n for n in inputs if not isinstance(named.get(n), torch.Tensor)]
    if missing:
        raise VerificationError(f"tensorrt export: engine inputs {missing} match no example input tensor "
                                f"(inputs are {sorted(named)})")
    feeds = {n: named[n].contiguous() for n in inputs}
    for name, t in feeds.items():
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())
    dtypes = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
              "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool}
    outputs = []
    for name in (n for n in names if n not in feeds):
        out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtypes[engine.get_tensor_dtype(name).name],
                          device=DEVICE)
        context.set_tensor_address(name, out.data_ptr())
        outputs.append(out)
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise VerificationError("tensorrt export: the serialized engine failed to execute")
    stream.synchronize()
    return outputs


def export_tensorrt(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, precision: str | None = None,
                    dynamic_shapes: Any = None, verify: bool = True, rtol: float | None = None) -> ExportResult:
    """Compile ``model`` with TensorRT on the example inputs and save it to ``path``.

    ``.engine`` writes the raw serialized engine (the whole graph must convert); ``.ts`` a TorchScript module; any
    other suffix (e.g. ``.ep``) a ``torch.export`` program; both of the latter load with ``torch_tensorrt``
    imported. ``precision`` ``"fp16"`` casts the model's floating weights and inputs to float16, and the engine is
    built strongly typed (``use_explicit_typing=True``: layers keep the model's dtypes; older torch_tensorrt
    releases default to weak typing, free to run layers in other precisions), so it takes float16 inputs.
    ``dynamic_shapes`` is a torch.export spec or ``"batch"``; TensorRT builds for each dynamic dim's range (an
    unbounded one gets torch_tensorrt's default maximum: bound it with ``torch.export.Dim(..., max=N)``).
    ``verify=True`` reloads the file and compares it on the GPU with the float32 model; the max relative error must
    stay under ``rtol`` (default 1e-3 fp32, 1e-2 fp16).
    """
    precision = check_precision(precision)
    check_module(model)
    inputs = normalize_inputs(example_inputs)
    torch_tensorrt = _torch_tensorrt()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = copy.deepcopy(model).eval().to(DEVICE)
    reference = run_model(model, pytree.tree_map(lambda x: _to(x, DEVICE, torch.float32), inputs))
    model = model.to(dtype)
    args, kwargs = pytree.tree_map(lambda x: _to(x, DEVICE, dtype), inputs)
    if dynamic_shapes == "batch":
        dynamic_shapes = batch_dynamic_shapes(model, (args, kwargs))
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = [f"TensorRT via torch_tensorrt {getattr(torch_tensorrt, '__version__', '?')}, {precision}"]
    if precision == "fp16":
        notes.append("weights cast to float16: feed float16 inputs")
    if path.suffix == ".engine":
        data = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
            program, arg_inputs=list(args), kwarg_inputs=kwargs, use_explicit_typing=True)
        path.write_bytes(data)
    else:
        trt_module = torch_tensorrt.compile(program, ir="dynamo", arg_inputs=list(args), kwarg_inputs=kwargs,
                                            use_explicit_typing=True)
        output_format = "torchscript" if path.suffix == ".ts" else "exported_program"
        torch_tensorrt.save(trt_module, str(path), output_format=output_format, arg_inputs=list(args),
                            kwarg_inputs=kwargs)
    if not verify:
        return ExportResult(path, "tensorrt", notes=notes)
    if path.suffix == ".engine":
        named = dict(zip(program.graph_signature.user_inputs, pytree.tree_leaves((args, kwargs))))
        outputs = _run_engine(path.read_bytes(), named)
        reference = tensor_leaves(reference)
    else:
        loaded = torch.jit.load(str(path)) if path.suffix == ".ts" else torch.export.load(path).module()
        outputs = run_model(loaded, (args, kwargs), name="example_inputs (reloaded TensorRT module)")
    err = compare_outputs(reference, outputs)
    tol = TOLERANCE[precision] if rtol is None else rtol
    check_error("tensorrt", f"{path}'s outputs", err, tol)
    notes.append("verified by reloading the file on CUDA")
    return ExportResult(path, "tensorrt", err["max_abs"], err["max_rel"], notes)
