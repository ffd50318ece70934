"""Shared pieces of the bad-input suite: tiny models, and the check that a refused call left the caller's model
exactly as it was (weights bit for bit, mode flags, module types, hooks, dsx attributes)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

DSX_ATTRS = ("_dsx_history", "_dsx_origin", "_dsx_report", "_compiled_call_impl")


def mlp() -> nn.Sequential:
    """64 -> 64 -> 32: both linears take int8, and the first one 2:4 sparsity (in a multiple of 64, out of 32)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


class Raising(nn.Module):
    """A model that raises on every input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model refuses every input")


def nan_mlp() -> nn.Sequential:
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 64)


def nan_x() -> torch.Tensor:
    t = x()
    t[0, 0] = float("nan")
    return t


def img() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    dtypes: dict[str, tuple[torch.dtype, tuple[int, ...], torch.device]]
    training: dict[str, bool]
    types: dict[str, type]
    params: dict[str, tuple[int, bool]]
    hooks: dict[str, tuple[int, int, int]]
    attrs: dict[str, Any]


def snapshot(model: nn.Module) -> Snapshot:
    """Everything about ``model`` a refused call must leave alone."""
    state = {k: _bytes(v).clone() for k, v in model.state_dict().items()}
    dtypes = {k: (v.dtype, tuple(v.shape), v.device) for k, v in model.state_dict().items()}
    training = {n: m.training for n, m in model.named_modules()}
    types = {n: type(m) for n, m in model.named_modules()}
    params = {n: (id(p), p.requires_grad) for n, p in model.named_parameters()}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for n, m in model.named_modules()}
    attrs = {a: (id(getattr(model, a, None)), repr(getattr(model, a, None))) for a in DSX_ATTRS}
    return Snapshot(state, dtypes, training, types, params, hooks, attrs)


def assert_untouched(model: nn.Module, snap: Snapshot) -> None:
    """``model`` is byte-identical to ``snap``: same tensors bit for bit, modes, module types, parameters, hooks."""
    now = snapshot(model)
    assert now.types == snap.types, "module types changed"
    assert now.training == snap.training, "training flags changed"
    assert now.dtypes == snap.dtypes, "state dict keys, dtypes, shapes or devices changed"
    for k, v in snap.state.items():
        assert torch.equal(now.state[k], v), f"{k} changed"
    assert now.params == snap.params, "parameters replaced or requires_grad changed"
    assert now.hooks == snap.hooks, "hooks added or removed"
    assert now.attrs == snap.attrs, "dsx attributes changed"


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with a hash of its bytes: for checking files are left alone."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


BAD = (TypeError, ValueError)
"""What a refused call raises: a wrong type or a bad value."""


def case(id: str, call: Any, match: str, exc: Any = BAD, make: Any = mlp) -> Any:
    """One parametrized refusal: ``call(make())`` raises ``exc`` with a message matching ``match``."""
    return pytest.param(make, call, exc, match, id=id)


def assert_refused(model: nn.Module, call: Any, exc: Any, match: str, *args: Any) -> None:
    """``call(model, *args)`` raises ``exc`` matching ``match`` and leaves ``model`` exactly as it was."""
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        call(model, *args)
    assert_untouched(model, snap)
