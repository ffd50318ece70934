"""ONNX export of a Hugging Face decoder "with past": past key/value inputs and present outputs, named as optimum
names them, so onnxruntime can decode token by token; verified by greedy decoding against PyTorch.
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from dsx.core.inputs import check_finite_parameters, normalize_inputs
from dsx.core.transform import VerificationError, compare_outputs
from dsx.export.onnx import _require_onnx, check_exportable, check_quantized, write_onnx
from dsx.export.result import ExportResult, cache_argument, check_error
from dsx.quant.quantize import quantized_module

DECODE_STEPS = 16
"""Greedy steps onnxruntime decodes to verify a file: the prompt, then one token per step."""

Step = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]


def present(output: Any) -> list[torch.Tensor]:
    """The keys and values of every layer of a decoder output's cache, flat: layer 0 key, layer 0 value, ..."""
    cache = output["cache"] if "cache" in output else output["past_key_values"]
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class DecoderWithPast(nn.Module):
    """A Hugging Face causal LM called with a ``DynamicCache`` built from flat past tensors; returns the logits and
    the flat present tensors, which is the signature an ONNX "with past" decoder has."""

    def __init__(self, model: nn.Module, cache_arg: str) -> None:
        super().__init__()
        self.model = model
        self.cache_arg = cache_arg

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor],
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        extra = {} if position_ids is None else {"position_ids": position_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_arg: cache}, **extra)
        return (out["logits"], *present(out))


def positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last ``new`` tokens under ``mask`` (left padding skipped, as ``generate`` counts)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)[:, -new:]


def greedy(step: Step, ids: torch.Tensor, mask: torch.Tensor, empty: list[torch.Tensor], steps: int,
           tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Decode ``steps`` tokens greedily from the prompt ``ids`` with ``step``: the chosen tokens ``[batch, steps]``
    and the last-position logits of every step. ``tokens`` (another run's choice) are fed instead of this run's
    own, so two runs are compared position by position."""
    past, chosen, logits = empty, [], []
    for i in range(steps):
        out, past = step(ids, mask, past)
        logits.append(out[:, -1].float())
        chosen.append(logits[-1].argmax(-1, keepdim=True))
        ids = chosen[-1] if tokens is None else tokens[:, i:i + 1]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.cat(chosen, dim=1), logits


def _check(model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]], dynamic_shapes: Any) -> torch.Tensor:
    """The example ``input_ids`` of a decoder ``kv_cache=True`` can export, or a ``ValueError`` saying why not."""
    if dynamic_shapes is not None:
        raise ValueError("dynamic_shapes: kv_cache=True exports batch, sequence and past lengths dynamic itself; "
                         "leave dynamic_shapes None")
    if cache_argument(model) is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"model: kv_cache=True needs a Hugging Face decoder-only causal LM whose forward takes a KV "
                         f"cache (use_cache and cache / past_key_values); {type(model).__name__} does not")
    args, kwargs = inputs
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or not ids.numel():
        raise ValueError("example_inputs: kv_cache=True needs input_ids, a non-empty [batch, seq] integer tensor "
                         "(as the first argument or the input_ids key)")
    return ids


def export_decoder_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                        dynamic_shapes: Any = None, opset: int | None = None, verify: bool = True,
                        rtol: float | None = None, steps: int = DECODE_STEPS) -> ExportResult:
    """Export a Hugging Face causal LM to the ONNX file ``path`` with its KV cache, the way optimum exports
    "with past": inputs ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key`` / ``.value`` (and
    ``position_ids`` where the model takes them), outputs ``logits`` and ``present.{i}.key`` / ``.value``; batch,
    new-token and past lengths are dynamic, and a past of length 0 starts decoding from a prompt.

    Args:
        model: a decoder-only ``*ForCausalLM`` (float or quantized by dsx).
        example_inputs: the prompt: ``input_ids`` (and optionally ``attention_mask``) as kwargs or first argument.
        path: the ``.onnx`` file to write.
        dynamic_shapes: must be None (the dynamic dims are fixed by this form).
        opset: the ONNX opset (default 20).
        verify: decode ``steps`` greedy tokens from the prompt in onnxruntime and in PyTorch.
        rtol: the logits' max relative error allowed (default 1e-4; a quantized model is checked by cosine).
        steps: how many greedy steps to verify.

    Returns:
        The ``ExportResult``; its errors are over the logits of every step.

    Raises:
        ValueError: not a decoder-only LM with a cache, no ``input_ids``, or ``dynamic_shapes`` given.
        VerificationError: onnxruntime chose other tokens than PyTorch, or its logits drift past ``rtol``.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path: an ONNX file name must end in .onnx, got {str(path)!r}")
    check_exportable(model)
    check_finite_parameters(model)
    inputs = normalize_inputs(example_inputs)
    ids = _check(model, inputs, dynamic_shapes)
    if type(steps) is not int or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    _, ort = _require_onnx()
    mask = inputs[1].get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(torch.long)
    notes = []
    if model.training:
        model = copy.deepcopy(model).eval()
        notes.append("exported in eval mode")
    wrapper = DecoderWithPast(model, cache_argument(model))
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def torch_step(ids: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor]) -> Any:
        extra = {"position_ids": positions(mask, ids.shape[1])} if takes_positions else {}
        with torch.no_grad():
            out = wrapper(ids, mask, past, **extra)
        return out[0], list(out[1:])

    empty = _empty_past(torch_step, ids, mask)
    traced = _trace_inputs(torch_step, ids, mask, empty, takes_positions)
    names = ["input_ids", "attention_mask"] + [f"past_key_values.{i // 2}.{'value' if i % 2 else 'key'}"
                                               for i in range(len(empty))]
    names += ["position_ids"] if takes_positions else []
    dim = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {0: dim, 1: dim}, "attention_mask": {0: dim, 1: dim},
              "past": [{0: dim, 2: dim}] * len(empty)}
    if takes_positions:
        shapes["position_ids"] = {0: dim, 1: dim}
    outputs = ["logits"] + [n.replace("past_key_values", "present") for n in names[2:2 + len(empty)]]
    write_onnx(wrapper, traced, path, dynamic_shapes=shapes, opset=opset, notes=notes, input_names=names,
               output_names=outputs)
    notes.append(f"with past: {len(empty) // 2} layers of past_key_values inputs and present outputs")
    if not verify:
        return ExportResult(path, "onnx", notes=notes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def onnx_step(ids: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor]) -> Any:
        feeds = {"input_ids": ids, "attention_mask": mask, **dict(zip(names[2:], past)),
                 "position_ids": positions(mask, ids.shape[1])}
        wanted = [i.name for i in session.get_inputs()]
        out = session.run(None, {n: feeds[n].numpy() for n in wanted})
        return torch.from_numpy(out[0]), [torch.from_numpy(o) for o in out[1:]]

    tokens, reference = greedy(torch_step, ids, mask, empty, steps)
    got, logits = greedy(onnx_step, ids, mask, empty, steps, tokens=tokens)
    err = compare_outputs(reference, logits)
    same = int((got == tokens).sum())
    if rtol is None and quantized_module(model) is not None:
        check_quantized(reference, logits, notes)
        notes.append(f"{same} of {tokens.numel()} greedy tokens as PyTorch's")
    else:
        check_error("onnx", "onnxruntime's decoding logits", err, 1e-4 if rtol is None else rtol)
        if same != tokens.numel():
            raise VerificationError(f"onnx export: onnxruntime chose {tokens.numel() - same} of {tokens.numel()} "
                                    f"greedy tokens differently from PyTorch")
        notes.append(f"{steps} greedy steps in onnxruntime: the same tokens as PyTorch")
    return ExportResult(path, "onnx", err["max_abs"], err["max_rel"], notes)


def _empty_past(step: Step, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Zero-length past tensors shaped like the model's cache (its head counts and sizes), from one run."""
    _, present_ = step(ids, mask, [])
    return [t[:, :, :0] for t in present_]


def _trace_inputs(step: Step, ids: torch.Tensor, mask: torch.Tensor, empty: list[torch.Tensor],
                  takes_positions: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs to trace the decoder on: a batch of 2 with 2 new tokens after a past of 2 or more (export
    specializes sizes 0 and 1, so every dynamic dim is traced at 2 or more)."""
    reps = (max(1, -(-2 // ids.shape[0])), max(1, -(-2 // ids.shape[1])))
    ids, mask = ids.repeat(reps), mask.repeat(reps)
    _, past = step(ids, mask, [t.repeat(reps[0], 1, 1, 1) for t in empty])
    new = ids[:, :2]
    mask = torch.cat([mask, torch.ones_like(mask[:, :2])], dim=1)
    kwargs = {"position_ids": positions(mask, 2)} if takes_positions else {}
    return (new, mask, past), kwargs
