"""The one-liner: ``dsx.optimize(model, example_inputs)`` returns an equivalent, faster inference module.

It runs ``Quantize`` when asked, then the ``Fuse`` transform (capture, graph passes, verification) on an
eval-mode copy of the model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from dsx.core.compose import compose
from dsx.core.inputs import check_module
from dsx.core.transform import Transform
from dsx.graph.fuse import Fuse
from dsx.quant.config import QuantConfig
from dsx.quant.quantize import Quantize


def optimize(model: nn.Module, example_inputs: Any, *, passes: list[str] | str | None = None,
             dynamic_batch: bool = False, quantize: str | QuantConfig | None = None, calibration: Any = None,
             inplace: bool = False, verify: bool = True) -> nn.Module:
    """Capture ``model`` on ``example_inputs``, run the dsx fusion passes and verify the result.

    ``passes``: ``None`` for the default set of the model's device, ``"all"``, or a list of pass names
    (``dsx.available_passes()``). The result accepts the example shapes only, unless ``dynamic_batch=True``
    (dim 0 of every input may vary; the example needs a batch of 2 or more). It is for inference;
    ``dsx.fusions(result)`` and ``dsx.summary(result)`` report what fired. ``quantize`` (a ``dsx.quantize``
    format or config, with ``calibration`` batches for static formats) quantizes before fusing, and each step is
    verified with its own tolerance. Raises ``dsx.VerificationError`` if outputs drift.
    """
    check_module(model)
    if model.training:
        model = (model if inplace else copy.deepcopy(model)).eval()
        inplace = True
    steps: list[Transform] = []
    if quantize is not None:
        steps.append(Quantize(quantize, calibration=calibration, verify=verify))
    steps.append(Fuse(passes, dynamic_batch, verify=verify))
    return compose(*steps, inplace=inplace)(model, example_inputs)
