"""Distributed calibration: all-reduce observer statistics so every rank ends with the scales of the union's data.

Observers hold exact, mergeable statistics (max, counts, histograms), so one MAX and one SUM all-reduce make each
rank's observers equal, bit for bit, to one observer fed every rank's batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dsx.core.dist import collective_device
from dsx.quant.calibrate import Observers
from dsx.quant.observers import ChannelAbsMax, HistogramObserver, MinMaxObserver, Observer

M = TypeVar("M", bound=Mapping[str, Any])


def _members(observers: Mapping[str, Any]) -> list[tuple[str, Observer | ChannelAbsMax]]:
    """Every observer in ``observers`` as ``(key, observer)``, keys sorted (the same order on every rank)."""
    if not isinstance(observers, Mapping):
        raise TypeError(f"observers: expected a dict of name -> Observers / Observer / ChannelAbsMax, "
                        f"got {type(observers).__name__}")
    members = []
    for name in sorted(observers):
        value = observers[name]
        if not isinstance(name, str):
            raise TypeError(f"observers: expected str names, got {name!r}")
        if isinstance(value, Observers):
            members.append((f"{name}/activation", value.activation))
            if value.channel_absmax is not None:
                members.append((f"{name}/channel_absmax", value.channel_absmax))
        elif isinstance(value, (Observer, ChannelAbsMax)):
            members.append((name, value))
        else:
            raise TypeError(f"observers[{name!r}]: expected an Observers, Observer or ChannelAbsMax, "
                            f"got {type(value).__name__}")
    for key, obs in members:
        if isinstance(obs, Observer) and not isinstance(obs, (MinMaxObserver, HistogramObserver)):
            raise TypeError(f"observers: {key}: cannot sync a {type(obs).__name__}; expected a MinMaxObserver, a "
                            "HistogramObserver or a ChannelAbsMax")
    return members


def _layout(key: str, obs: Observer | ChannelAbsMax) -> tuple[str, str, int | None]:
    """What must agree across ranks for one observer: its key, class and histogram size."""
    return key, type(obs).__name__, obs.bins if isinstance(obs, HistogramObserver) else None


def _channels(members: list[tuple[str, Observer | ChannelAbsMax]], gathered: list[list[Any]]) -> dict[str, int]:
    """Channel count of every ``ChannelAbsMax`` across ranks (ranks that saw no data have 0); mismatches raise."""
    channels: dict[str, int] = {}
    for i, (key, obs) in enumerate(members):
        if not isinstance(obs, ChannelAbsMax):
            continue
        seen = {rank_info[i] for rank_info in gathered if rank_info[i]}
        if len(seen) > 1:
            raise ValueError(f"sync_observers: {key}: the ranks observed different channel counts {sorted(seen)}")
        channels[key] = seen.pop() if seen else 0
    return channels


def sync_observers(observers: M, group: Any = None) -> M:
    """Make every rank's observers hold the statistics of all ranks' data, in place; returns ``observers``.

    ``observers`` maps names to ``Observers`` (as ``dsx.quant.calibrate.observe_inputs`` returns them), ``Observer``
    or ``ChannelAbsMax`` objects; every rank of ``group`` (default: the default group) must call this with the same
    names and observer kinds (a mismatch raises ``ValueError`` on every rank). Afterwards each observer equals,
    bit for bit, one observer fed the union of the ranks' data: min-max and per-channel max are all-reduced with
    MAX and counts with SUM; histogram observers first agree on the range (MAX of their maxima, ``grow_range``),
    then SUM their histograms, which the observers' exact binning makes order-independent. A rank that observed
    nothing contributes empty statistics. Without an initialized process group this is a no-op.
    """
    members = _members(observers)
    if not (dist.is_available() and dist.is_initialized()):
        return observers
    layout = [_layout(key, obs) for key, obs in members]
    local = [obs.channels if isinstance(obs, ChannelAbsMax) else None for _, obs in members]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (layout, local), group=group)
    for rank, (other, _) in enumerate(gathered):
        if other != layout:
            theirs, mine = set(map(tuple, other)), set(layout)
            raise ValueError(f"sync_observers: rank {rank} has different observers from rank {dist.get_rank(group)}: "
                             f"only there {sorted(theirs - mine)}, only here {sorted(mine - theirs)}")
    channels = _channels(members, [info for _, info in gathered])
    device = collective_device(group)

    maxima = []
    for key, obs in members:
        state = obs.state()
        if isinstance(obs, ChannelAbsMax):
            amax = state["amax"].to(device)
            maxima.append(amax if amax.numel() else torch.zeros(channels[key], dtype=torch.float64, device=device))
        else:
            maxima.append(state["max"].to(device).reshape(1))
    maximum = torch.cat(maxima)
    dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
    maxima = list(maximum.split([m.numel() for m in maxima]))

    sums = []
    for (_, obs), top in zip(members, maxima):
        if isinstance(obs, HistogramObserver):
            obs.grow_range(top)
            sums.append(obs.state()["hist"].to(device))
        else:
            sums.append(obs.state()["count"].to(device).reshape(1))
    total = torch.cat(sums)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)

    for (_, obs), top, summed in zip(members, maxima, total.split([s.numel() for s in sums])):
        home = obs.state()["amax" if isinstance(obs, ChannelAbsMax) else "max"].device
        top, summed = top.to(home), summed.to(home)
        if isinstance(obs, HistogramObserver):
            obs.load_state({"max": top.reshape(()), "hist": summed})
        elif isinstance(obs, ChannelAbsMax):
            obs.load_state({"amax": top if summed.item() else top[:0], "count": summed.reshape(())})
        else:
            obs.load_state({"max": top.reshape(()), "count": summed.reshape(())})
    return observers
