"""What ``dsx.optimize`` times and checks on each plan: the model's forward on the example inputs, or for a
Hugging Face generative model a short greedy ``generate()``, since decode is what such a model spends its time on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from dsx.core.inputs import Inputs, run_model

GENERATE_TOKENS = 16


def is_generative(model: nn.Module) -> bool:
    """A Hugging Face model with a working ``generate()`` (``GenerationMixin`` and ``can_generate()``)."""
    can = getattr(model, "can_generate", None)
    try:
        return callable(getattr(model, "generate", None)) and callable(can) and bool(can())
    except Exception:  # a model's own can_generate may raise on odd configs: then it does not generate
        return False


@dataclass
class Workload:
    """``run(model)`` is the call timed; ``exact`` says whether its outputs (token ids) must equal the original's
    for a lossless plan; ``describe`` is what the report says was timed."""

    run: Callable[[nn.Module], Any]
    describe: str
    exact: bool = False


def default_workload(model: nn.Module, inputs: Inputs) -> Workload:
    """``generate(GENERATE_TOKENS new tokens)`` for generative models given ``input_ids``, else the forward."""
    args, kwargs = inputs
    ids = kwargs.get("input_ids", args[0] if args else None)
    if is_generative(model) and isinstance(ids, torch.Tensor) and not ids.is_floating_point():
        gen = {k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask")} or {"input_ids": ids}
        if not kwargs and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].shape == ids.shape:
            gen["attention_mask"] = args[1]  # HF forwards take (input_ids, attention_mask, ...) positionally
        pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        extra = {} if pad is not None else {"pad_token_id": eos if isinstance(eos, int) else 0}

        def generate(m: nn.Module) -> Any:
            with torch.no_grad():
                return m.generate(**gen, max_new_tokens=GENERATE_TOKENS, min_new_tokens=GENERATE_TOKENS,
                                  do_sample=False, **extra)

        return Workload(generate, f"generate({GENERATE_TOKENS} new tokens, greedy)", exact=True)
    return Workload(lambda m: run_model(m, inputs), "forward on the example inputs")


def user_workload(fn: Callable[[nn.Module], Any]) -> Workload:
    """A workload from the caller's ``workload(model)`` callable."""
    name = getattr(fn, "__name__", type(fn).__name__)
    return Workload(lambda m: fn(m), f"workload {name}(model)")
