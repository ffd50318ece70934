"""torch.distributed helpers the layers below ``dsx.parallel`` need (quantization syncs its calibration across
ranks): whether to sync, where a group's collectives take tensors, and a scalar all-reduce."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed_active(distributed: bool | None, group: Any = None) -> bool:
    """Whether to sync across ranks: ``distributed=True`` (needs an initialized process group), or ``None`` (auto)
    with an initialized group of more than one rank; ``False`` never syncs."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected True, False or None (auto), got {distributed!r}")
    if distributed is False:
        return False
    initialized = dist.is_available() and dist.is_initialized()
    if distributed and not initialized:
        raise ValueError("distributed: True needs an initialized torch.distributed process group; call "
                         "torch.distributed.init_process_group first (or pass distributed=None for auto)")
    return initialized and (bool(distributed) or dist.get_world_size(group) > 1)


def collective_device(group: Any) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_scalar(value: float, op: str = "sum", group: Any = None) -> float:
    """``value`` reduced over the ranks of ``group`` (default group) with ``op`` (``"sum"`` or ``"max"``), in float64.

    Returns ``value`` itself when no process group is initialized.
    """
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op: expected one of {sorted(ops)}, got {op!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=ops[op], group=group)
    return float(t.item())
