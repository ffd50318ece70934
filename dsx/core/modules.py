"""Module-tree helpers every layer shares: replace a submodule by name, and recognise Hugging Face's ``Conv1D``
(a linear layer with its weight stored transposed), so quantization, pruning and parallelism agree on both."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.utils.parametrize import type_before_parametrizations


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` in ``model``; returns the model (``module`` itself when ``name`` is the root)."""
    if not name:
        return module
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return model


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2), masked or not: a linear layer whose weight is stored ``[in, out]``."""
    if module is None:
        return False
    nf = getattr(module, "nf", None)
    return (type_before_parametrizations(module).__name__ == "Conv1D" and isinstance(nf, int)
            and not isinstance(nf, bool) and getattr(module, "weight", None) is not None)
