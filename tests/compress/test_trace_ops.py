"""dsx.compress.trace_ops: op names as the tables see them, and channel labels (placed, compacted, varying dims)."""

import numpy as np
import torch

from dsx.compress.trace_ops import along, compact, op_name, varying_dims


def test_op_names_fold_dunders_in_place_variants_and_attributes():
    assert op_name(torch.Tensor.__add__) == "add" and op_name(torch.Tensor.__radd__) == "add"
    assert op_name(torch.Tensor.add_) == "add" and op_name(torch.relu) == "relu"
    assert op_name(torch.Tensor.T.__get__) == "attr:T"


def test_along_places_ids_on_one_dim():
    label = along(np.array([3, -1, 5]), ndim=3, dim=1)
    assert label.shape == (1, 3, 1) and label.dtype == torch.int64 and label.flatten().tolist() == [3, -1, 5]
    assert varying_dims(label) == [1] and varying_dims(None) == []


def test_compact_drops_constant_dims_and_pads_missing_ones():
    label = torch.tensor([[7, 8], [7, 8]])
    out = compact(label, (4, 2, 2))
    assert out.shape == (1, 1, 2) and out.flatten().tolist() == [7, 8] and out.is_contiguous()
    assert compact(torch.tensor([[1], [2]]), (2, 1)).shape == (2, 1)
