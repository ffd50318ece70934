"""Module-tree helpers: set_module at any depth and at the root, and the one Hugging Face Conv1D check (masked
Conv1D layers included, look-alikes refused)."""

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.core.modules import is_hf_conv1d, set_module


def test_set_module_replaces_at_any_depth_and_the_root():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    assert set_module(model, "1.0", nn.GELU()) is model and isinstance(model[1][0], nn.GELU)
    new = nn.Identity()
    assert set_module(model, "", new) is new


def test_the_conv1d_check_knows_masked_conv1d_and_refuses_look_alikes():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(8, 16)
    assert is_hf_conv1d(conv) and not is_hf_conv1d(nn.Linear(16, 8)) and not is_hf_conv1d(None)
    masked = dsx.prune(nn.Sequential(conv), 0.5)[0]
    assert is_hf_conv1d(masked)

    class Conv1D(nn.Module):  # the name alone is not enough
        nf = True
        weight = torch.zeros(1)

    assert not is_hf_conv1d(Conv1D())
