"""The one-liner: ``dsx.optimize(model, example_inputs)`` returns an equivalent, faster inference module.

It runs ``Prune``, ``Sparsify`` and ``Quantize`` when asked, then the ``Fuse`` transform (capture, graph passes,
verification) on an eval-mode copy of the model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from dsx.compress.prune import Prune
from dsx.compress.sparsity import Sparsify
from dsx.core.compose import compose
from dsx.core.inputs import check_module
from dsx.core.transform import Transform
from dsx.graph.fuse import Fuse
from dsx.quant.config import QuantConfig
from dsx.quant.quantize import Quantize


def optimize(model: nn.Module, example_inputs: Any, *, passes: list[str] | str | None = None,
             dynamic_batch: bool = False, prune: float | None = None, structured: bool = False,
             sparsity: str | None = None, quantize: str | QuantConfig | None = None, calibration: Any = None,
             inplace: bool = False, verify: bool = True) -> nn.Module:
    """Capture ``model`` on ``example_inputs``, run the dsx fusion passes and verify the result.

    ``passes``: ``None`` for the default set of the model's device, ``"all"``, or a list of pass names
    (``dsx.available_passes()``). The result accepts the example shapes only, unless ``dynamic_batch=True``
    (dim 0 of every input may vary; the example needs a batch of 2 or more). It is for inference;
    ``dsx.fusions(result)`` and ``dsx.summary(result)`` report what fired. Before fusing, in this order:
    ``prune`` (a fraction, ``structured=True`` to shrink layers: ``dsx.prune``), ``sparsity`` (``"2:4"``:
    ``dsx.sparsify``) and ``quantize`` (a ``dsx.quantize`` format or config, with ``calibration`` batches for
    static formats); each step is verified with its own tolerance. Raises ``dsx.VerificationError`` if outputs drift.
    """
    check_module(model)
    if model.training:
        model = (model if inplace else copy.deepcopy(model)).eval()
        inplace = True
    steps: list[Transform] = []
    if prune is not None:
        steps.append(Prune(prune, structured=structured, verify=verify))
    elif structured:
        raise ValueError("structured: needs prune= (the fraction of parameters to remove)")
    if sparsity is not None:
        steps.append(Sparsify(sparsity, verify=verify))
    if quantize is not None:
        steps.append(Quantize(quantize, calibration=calibration, verify=verify))
    steps.append(Fuse(passes, dynamic_batch, verify=verify))
    return compose(*steps, inplace=inplace)(model, example_inputs)
