"""Bridge to bitsandbytes: swap an ``nn.Linear`` for its NF4 (``Linear4bit``) or LLM.int8() (``Linear8bitLt``) module.

The modules it returns save with safetensors and reload bit-exactly into a fresh ``to_bnb`` module with a strict
``load_state_dict``, which plain bitsandbytes 4-bit modules do not.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

FORMATS = ("nf4", "llm_int8")
INSTALL = 'pip install "dsx[bnb]"  (or: pip install bitsandbytes)'


def require_bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise ImportError(f"the nf4 / llm_int8 formats need bitsandbytes, which is not installed: {INSTALL}") from e


def _load_4bit_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                        strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                        error_msgs: list[str]) -> None:
    """Rebuild a ``Linear4bit`` weight from its saved quant-state keys (``weight.absmax``, ``weight.quant_map``, ...).

    bitsandbytes writes these keys but its own ``load_state_dict`` reports them as unexpected and cannot copy the
    packed ``[N * K / 2, 1]`` weight into a layer quantized with other statistics.
    """
    bnb = require_bitsandbytes()
    stem = prefix + "weight."
    stats = {key[len(stem):]: state_dict.pop(key) for key in list(state_dict) if key.startswith(stem)}
    if not stats:
        return
    if prefix + "weight" not in state_dict:
        error_msgs.append(f"{prefix}weight: the state dict has its 4-bit statistics but not the packed weight")
        return
    device = module.weight.device
    quant_state = bnb.functional.QuantState.from_dict(dict(stats), device=device)
    expected = torch.Size((module.out_features, module.in_features))
    if quant_state.shape != expected:
        error_msgs.append(f"size mismatch for {prefix}weight: the checkpoint quantized a {tuple(quant_state.shape)} "
                          f"weight, the layer expects {tuple(expected)}")
        return
    module.weight = bnb.nn.Params4bit.from_prequantized(state_dict[prefix + "weight"].clone(), stats,
                                                        requires_grad=False, device=device, module=module)


def _load_8bit_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                        strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                        error_msgs: list[str]) -> None:
    """Load ``SCB`` into a ``Linear8bitLt`` that has already run a forward (bitsandbytes then moved it to its state)."""
    key = prefix + "SCB"
    if key in state_dict and getattr(module.weight, "SCB", None) is None and module.state.SCB is not None:
        module.state.SCB.copy_(state_dict.pop(key))


def to_bnb(linear: nn.Linear, fmt: str, *, compute_dtype: torch.dtype | None = None,
           double_quant: bool = False) -> nn.Module:
    """A bitsandbytes module computing ``linear`` with quantized weights, on ``linear``'s device; ``linear`` is kept.

    ``fmt="nf4"``: ``Linear4bit(quant_type="nf4")``, blocks of 64 weights with a float32 absmax each
    (``double_quant=True`` quantizes those absmax to 8 bits too), matmul in ``compute_dtype`` (default: the
    weight's dtype). ``fmt="llm_int8"``: ``Linear8bitLt(has_fp16_weights=False, threshold=6.0)``, per-row int8
    weights from a float16 copy; input columns with a value above 6 run in float16.

    Cast the float layer to its final dtype before calling this; the result's integer weights do not convert.
    On CPU the nf4 layer always dequantizes to ``compute_dtype`` and runs ``F.linear``: bitsandbytes' AVX512-BF16
    path (bfloat16 absmax and activations) is switched off because its ``state_dict()`` corrupts the layer after
    an eval forward (bitsandbytes 0.50).
    """
    bnb = require_bitsandbytes()
    if fmt not in FORMATS:
        raise ValueError(f"to_bnb: fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"to_bnb: expected an nn.Linear, got {type(linear).__name__}")
    if isinstance(linear, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
        raise TypeError(f"to_bnb: the layer is already a bitsandbytes {type(linear).__name__}")
    weight = linear.weight.detach()
    if not weight.is_floating_point():
        raise TypeError(f"to_bnb: expected a floating-point weight, got {weight.dtype}")
    if fmt == "llm_int8" and (compute_dtype is not None or double_quant):
        raise ValueError("to_bnb: compute_dtype and double_quant apply to fmt='nf4' only (llm_int8 computes in "
                         "float16 and has one scale per row)")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"to_bnb: compute_dtype must be a floating torch.dtype, got {compute_dtype!r}")
    device, has_bias = weight.device, linear.bias is not None
    if fmt == "nf4":
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                   compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                                   quant_type="nf4", device="meta")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                          quant_type="nf4", module=module).to(device)
        module.support_avx512bf16_for_cpu = False
        module.register_load_state_dict_pre_hook(_load_4bit_pre_hook)
    else:
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                     threshold=6.0, device="meta")
        module.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        module.register_load_state_dict_pre_hook(_load_8bit_pre_hook)
    if has_bias:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.train(linear.training)
