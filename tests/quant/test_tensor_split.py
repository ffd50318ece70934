"""dsx.quant.tensor_split: placements of split buffers, and the argument checks before any collective."""

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard

from dsx.quant.tensor_split import placement, split_buffers


def test_placements():
    assert placement(None) == Replicate() and placement(1) == Shard(1)
    strided = placement(0, chunks=3)
    assert strided.dim == 0 and strided.split_factor == 3


@pytest.mark.parametrize("style,mesh,error,match", [
    ("diagonal", None, ValueError, r"style: expected one of \('colwise', 'rowwise'\), got 'diagonal'"),
    ("colwise", "cpu", TypeError, "mesh: expected a torch.distributed DeviceMesh, got str"),
])
def test_bad_arguments_are_refused_before_any_communication(style, mesh, error, match):
    layer = nn.Module()
    layer.register_buffer("weight", torch.zeros(4, 4))
    with pytest.raises(error, match=match):
        split_buffers(layer, style, mesh, {"weight": 0})
    assert layer.weight.shape == (4, 4)
