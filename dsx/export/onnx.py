"""Export a model to a self-contained ``.onnx`` file with ``torch.onnx.export(dynamo=True)``, verified in onnxruntime.

dsx kernel ops lower to standard ONNX operators (``dsx.export.onnx_ops``), so optimized models export like plain ones.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from dsx.core.inputs import Inputs, check_module, normalize_inputs, tensor_leaves
from dsx.core.transform import VerificationError, compare_outputs
from dsx.export.onnx_ops import DEFAULT_OPSET, translation_table
from dsx.export.qdq import qdq_form
from dsx.export.result import ExportResult, check_error, prepare, unpadded
from dsx.quant.linear import FP8, QuantLinear
from dsx.quant.qat import QATLinear
from dsx.quant.quantize import BNB_CLASSES, quantized_module

QUANTIZED_MIN_COSINE = 0.99
"""A quantized model is verified by cosine similarity: onnxruntime and PyTorch may round an activation to different
integers, and one flipped rounding moves a few outputs by a step of the scale."""


def min_cosine(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """The lowest cosine similarity between matching floating outputs (1.0 when there are none)."""
    sims = [torch.nn.functional.cosine_similarity(a.detach().double().flatten(), b.double().flatten(), dim=0).item()
            for a, b in zip(reference, outputs) if a.is_floating_point() and a.numel()]
    return min(sims, default=1.0)

INSTALL_HINT = 'pip install "dsx[onnx]"'


def _require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules (with ``onnxscript``, which the exporter needs), or ImportError."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}); install them with "
                          f"{INSTALL_HINT}") from e
    return onnx, onnxruntime


def _named_inputs(program: torch.export.ExportedProgram, inputs: Inputs) -> dict[str, Any]:
    """The example input leaves keyed by the exported program's input names, which the ONNX graph inputs keep."""
    names = [s.arg.name for s in program.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    named = pytree.tree_unflatten(names, program.call_spec.in_spec)
    args, kwargs = inputs
    ordered = (args, {k: kwargs[k] for k in named[1]})
    return dict(zip(pytree.tree_leaves(named), pytree.tree_leaves(ordered)))


def run_onnx(path: str | os.PathLike, feeds: dict[str, Any]) -> list[torch.Tensor]:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) on tensors keyed by the graph's input names."""
    _, ort = _require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if not isinstance(feeds.get(n), torch.Tensor)]
    if missing:
        raise VerificationError(f"onnx export: graph inputs {missing} match no example input tensor "
                                f"(the example inputs are {sorted(feeds)})")
    outputs = session.run(None, {n: feeds[n].detach().cpu().numpy() for n in names})
    return [torch.from_numpy(o) for o in outputs]


MIN_OPSET = 18
"""The oldest opset torch's dynamo ONNX exporter writes (it silently upgrades older requests)."""

FLOAT8_OPSET = 19
"""The first opset with float8 QuantizeLinear / DequantizeLinear / Cast."""


def _not_exportable(model: nn.Module) -> str | None:
    """The first module ONNX export cannot express yet (fake-quant QAT, bitsandbytes), None when none."""
    for name, m in model.named_modules():
        if isinstance(m, QATLinear) or type(m).__name__ in BNB_CLASSES:
            return f"{name or '<the model itself>'!r} ({type(m).__name__})"
    return None


def check_exportable(model: nn.Module) -> None:
    """Raise ``ValueError`` for a model holding a module ONNX export cannot express yet (QAT, bitsandbytes)."""
    check_module(model)
    if (bad := _not_exportable(model)) is not None:
        raise ValueError(f"model: {bad} cannot be exported to ONNX yet: QAT fake-quant and bitsandbytes layers "
                         "have no ONNX form here (dsx.convert a QAT model first)")


STRIDE_ERROR = "Cannot view a tensor"
"""The ONNX exporter's error when a decomposition gave a ``view``'s input other strides (see ``contiguous_views``)."""


def contiguous_views(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with a contiguous ``clone`` (an ``Identity`` in ONNX) before every ``view`` and ``reshape``.

    The ONNX exporter re-runs the graph after its decompositions, and ops such as CPU flash attention give their
    outputs other strides on that second run; a ``view`` chosen by the first run's strides then fails ("Cannot
    view a tensor with shape ...": T5, Swin with SDPA attention). A contiguous input makes every view valid on
    both runs; ``write_onnx`` exports the program's module again with this change when that error occurs.
    """
    graph = program.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
            with graph.inserting_before(node):
                dense = graph.call_function(torch.ops.aten.clone.default, (node.args[0],),
                                            {"memory_format": torch.contiguous_format})
            dense.meta = dict(node.args[0].meta)
            node.args = (dense, *node.args[1:])
    program.graph_module.recompile()
    return program


@contextlib.contextmanager
def batched_experts(model: nn.Module) -> Iterator[None]:
    """Run a Hugging Face MoE model's experts as batched matmuls while tracing, then restore its setting.

    Under tracing, transformers runs fp32 experts through its own ``transformers::grouped_mm_fallback`` op, which
    no ONNX translation covers, and its eager loop depends on the data; ``batched_mm`` exports as standard ops.
    """
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if not (callable(can_set) and can_set()) or set(model.get_experts_implementation().values()) <= {"batched_mm"}:
        yield
        return
    before = model.get_experts_implementation()
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(before)


def write_onnx(model: nn.Module, inputs: Inputs, path: Path, *, dynamic_shapes: Any, opset: int | None,
               notes: list[str], input_names: list[str] | None = None,
               output_names: list[str] | None = None) -> torch.export.ExportedProgram:
    """Trace ``model`` on ``inputs`` (int8_static / fp8 linears in their QDQ form), write the ONNX file ``path``,
    check it with ``onnx.checker`` and return the exported program (whose input names the graph keeps).

    Raises:
        ValueError: an ``opset`` under ``MIN_OPSET``, or under ``FLOAT8_OPSET`` for a model with fp8 layers.
    """
    onnx, _ = _require_onnx()
    opset = DEFAULT_OPSET if opset is None else opset
    if type(opset) is not int or opset < MIN_OPSET:
        raise ValueError(f"opset: torch's ONNX exporter writes opset {MIN_OPSET} or newer; got {opset!r}")
    fp8 = any(isinstance(m, QuantLinear) and m.weight_dtype == FP8 for m in model.modules())
    if fp8 and opset < FLOAT8_OPSET:
        raise ValueError(f"opset: float8 layers need ONNX opset >= {FLOAT8_OPSET}, got {opset}")
    traced, n_qdq = qdq_form(model)
    if n_qdq:
        notes.append(f"{n_qdq} int8_static linears as QuantizeLinear / DequantizeLinear pairs")
    args, kwargs = inputs

    def to_onnx(module: nn.Module) -> Any:
        return torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                 opset_version=opset, custom_translation_table=translation_table(opset),
                                 input_names=input_names, output_names=output_names, verbose=False)

    with batched_experts(traced):
        try:
            program = to_onnx(traced)
        except Exception as e:
            if STRIDE_ERROR not in str(e):
                raise
            exported = torch.export.export(traced, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            program = to_onnx(contiguous_views(exported).module())
            notes.append("views made contiguous (the exporter's decompositions changed an attention output's "
                         "strides)")
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    onnx.checker.check_model(str(path))
    notes.append(f"opset {opset}")
    return program.exported_program


def check_quantized(reference: list[torch.Tensor], outputs: list[torch.Tensor], notes: list[str]) -> None:
    """Raise ``VerificationError`` when onnxruntime's outputs of a quantized model fall under
    ``QUANTIZED_MIN_COSINE`` to PyTorch's; note the cosine otherwise."""
    cosine = min_cosine(reference, outputs)
    if cosine < QUANTIZED_MIN_COSINE:
        raise VerificationError(f"onnx export: onnxruntime's outputs of the quantized model have cosine similarity "
                                f"{cosine:.4f} to PyTorch's, under {QUANTIZED_MIN_COSINE}")
    notes.append(f"quantized: cosine similarity {cosine:.5f} to PyTorch")


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_shapes: Any = None,
                opset: int | None = None, verify: bool = True, rtol: float | None = None) -> ExportResult:
    """Export ``model`` on ``example_inputs`` to the ONNX file ``path`` (weights inside unless over 2 GB).

    ``dynamic_shapes`` is a torch.export spec, or ``"batch"`` to keep dim 0 of every input dynamic; ``opset`` is
    the ONNX opset (default 20). Non-tensor inputs are baked into the graph; a Hugging Face decoder is exported
    with ``use_cache=False`` (``dsx.export.decoder`` writes one with its KV cache). The file passes
    ``onnx.checker``; with ``verify=True`` it is run in onnxruntime on the example inputs and compared with
    PyTorch's outputs (``max_abs`` / ``max_rel`` in the result; positions an ``attention_mask`` pads are not
    compared); a max relative error over ``rtol`` (default 1e-4)
    raises ``VerificationError``, and for a quantized model without an ``rtol`` a cosine similarity under
    ``QUANTIZED_MIN_COSINE`` does. A model in training mode is exported in eval mode (a copy).
    dsx ``int8`` linears export as per-token quantization and ``MatMulInteger``, ``int8_static`` ones as QDQ
    pairs with the calibrated scales, ``int8_weight_only`` as a per-channel ``DequantizeLinear`` weight, ``fp8`` as
    a row-wise float8 ``QuantizeLinear`` (opset >= 19); QAT (``dsx.convert`` it first) and bitsandbytes modules are
    refused with a ``ValueError``.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path: an ONNX file name must end in .onnx, got {str(path)!r}")
    check_exportable(model)
    by_cosine = rtol is None and quantized_module(model) is not None
    inputs = normalize_inputs(example_inputs)
    _require_onnx()
    model, inputs, dynamic_shapes, notes, expected = prepare(model, inputs, dynamic_shapes)
    program = write_onnx(model, inputs, path, dynamic_shapes=dynamic_shapes, opset=opset, notes=notes)
    if not verify:
        return ExportResult(path, "onnx", notes=notes)
    reference = unpadded(inputs, tensor_leaves(expected))
    outputs = unpadded(inputs, run_onnx(path, _named_inputs(program, inputs)))
    err = compare_outputs(reference, outputs)
    if by_cosine:
        check_quantized(reference, outputs, notes)
    else:
        check_error("onnx", "onnxruntime's outputs", err, 1e-4 if rtol is None else rtol)
    notes.append("verified in onnxruntime (CPUExecutionProvider)")
    return ExportResult(path, "onnx", err["max_abs"], err["max_rel"], notes)
