"""Training checkpoints (model, optimizer, step) of dsx models: masks, QAT scales, int8 buffers, via torch's DCP.

Each save is written to ``step_N.tmp`` and renamed to ``step_N`` once complete, so a job killed mid-save resumes from
the previous checkpoint; DCP shards the writes across ranks and handles DDP, FSDP2 and DTensor state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from dsx.core.atomic import commit, write_bytes
from dsx.core.checks import check_path
from dsx.core.serialize import read_tagged_json
from dsx.core.transform import history
from dsx.core.dist import distributed_active
from dsx.parallel.safe_dcp import SafeLoadPlanner, SafeReader, check_entries

META = "dsx_checkpoint.json"
FORMAT, VERSION = "dsx-checkpoint", 1
STEP_DIR = re.compile(r"step_(\d+)")


def _rank(group: Any) -> int:
    return dist.get_rank(group) if distributed_active(None, group) else 0


def _on_rank0(fn: Callable[[], Any], group: Any) -> Any:
    """``fn()`` run on rank 0 only; its result, or its exception, reaches every rank (so no rank waits forever)."""
    result: list[Any] = [None]
    if _rank(group) == 0:
        try:
            result[0] = (True, fn())
        except Exception as e:  # re-raised on every rank below
            result[0] = (False, e)
    if distributed_active(None, group):
        dist.broadcast_object_list(result, group=group, group_src=0)
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _everywhere(error: str | None, group: Any) -> None:
    """Raise ``ValueError`` on every rank when any rank found an error (all ranks call this)."""
    errors = [error]
    if distributed_active(None, group):
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
    for rank, message in enumerate(errors):
        if message is not None:
            raise ValueError(message if len(errors) == 1 else f"rank {rank}: {message}")


def _dcp(fn: Callable[..., Any], state: dict[str, Any], ckpt: Path, group: Any, **kwargs: Any) -> Any:
    """``dcp.save`` / ``async_save`` / ``load`` across the group's ranks, or in this process alone (without DCP's
    warning); what it returns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        return fn(state, checkpoint_id=ckpt, process_group=group, no_dist=not distributed_active(None, group),
                  **kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    return step


def _commit(tmp: Path, final: Path, meta: dict[str, Any]) -> Path:
    """Write the metadata into ``tmp``, then swap ``tmp`` in as ``final`` (replacing an older ``final``)."""
    write_bytes(tmp / META, json.dumps(meta, indent=2).encode())
    return commit(tmp, final)


def _prepare(path: Path, tmp: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if tmp.exists():  # left by a save that was killed
        shutil.rmtree(tmp)


class AsyncCheckpoint:
    """A checkpoint being written in the background by ``save_checkpoint(..., asynchronous=True)``: ``wait()`` (on
    every rank, like the save) blocks until every rank's shard is written, commits ``step_<N>`` on rank 0, and
    returns that directory on every rank; a failed write raises there, and nothing is committed."""

    def __init__(self, final: Path, written: Future, commit: Callable[[], Path], group: Any) -> None:
        self.path = final
        self._written, self._commit, self._group = written, commit, group
        self._result: Path | None = None

    def done(self) -> bool:
        """Whether this rank's part is written (``wait()`` still commits it)."""
        return self._written.done()

    def wait(self) -> Path:
        """Finish the checkpoint (see the class); calling it again returns the same directory.

        Raises:
            Exception: what the background write raised on any rank (the directory stays ``.tmp``).
        """
        if self._result is None:
            error = None
            try:
                self._written.result()
            except Exception as e:  # every rank learns of it below, so none waits for a commit that never comes
                error = f"the asynchronous checkpoint write failed: {type(e).__name__}: {e}"
            _everywhere(error, self._group)
            self._result = _on_rank0(self._commit, self._group)
            _PENDING.pop(self.path, None)
        return self._result


_PENDING: dict[Path, AsyncCheckpoint] = {}
"""Unfinished asynchronous saves by step directory: the next save into the same root finishes them first."""

_ASYNC_GROUPS: dict[Any, Any] = {}
"""A gloo group per process group for asynchronous saves: their collectives run on a background thread, which must
not share a group with the training loop's collectives."""


def _async_group(group: Any) -> Any:
    if not distributed_active(None, group):
        return group
    if group not in _ASYNC_GROUPS:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _ASYNC_GROUPS[group] = dist.new_group(ranks=ranks, backend="gloo")
    return _ASYNC_GROUPS[group]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    step: int, extra: dict[str, Any] | None = None, process_group: Any = None,
                    asynchronous: bool = False) -> Path | AsyncCheckpoint:
    """Save ``model`` (and ``optimizer``) at training step ``step`` as ``path/step_<step>``; returns that directory.

    Every rank of ``process_group`` (default group) calls it when ``torch.distributed`` is initialized; without a
    group it saves from this process alone. The state dicts come from ``torch.distributed.checkpoint.state_dict``
    (DDP, FSDP2 and DTensor aware) and are written by DCP to ``path/step_<step>.tmp``; rank 0 then writes
    ``dsx_checkpoint.json`` (step, ``extra``, the model's dsx history) and renames the directory, so
    ``step_<step>`` exists only when complete. ``extra`` is a JSON-able dict (an epoch, a scheduler's state) taken
    from rank 0. An optimizer that has not stepped yet has no state: it is not saved, and ``load_checkpoint``
    leaves the optimizer it is given as it is.

    ``asynchronous=True`` copies the state to CPU memory, writes it from a background thread through
    ``torch.distributed.checkpoint.async_save`` (on a gloo group of its own) and returns an ``AsyncCheckpoint``
    at once, so training continues while the files are written; its ``wait()`` commits ``step_<step>``. The next
    save into ``path`` waits for an unfinished one first. Until committed the directory stays ``.tmp``, so a job
    killed during the write resumes from the previous checkpoint.
    """
    step = _check_step(step)
    if not isinstance(asynchronous, bool):
        raise TypeError(f"asynchronous: expected True or False, got {asynchronous!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra: expected a JSON-able dict or None, got {type(extra).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    meta = {"format": FORMAT, "version": VERSION, "step": step, "extra": extra, "history": history(_unwrap(model)),
            "optimizer": optimizer is not None and bool(optimizer.state)}
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra: expected a JSON-able dict: {e}") from e
    path = check_path("path", path, directory=True)
    tmp, final = path / f"step_{step}.tmp", path / f"step_{step}"
    for pending in [c for c in _PENDING.values() if c.path.parent == path]:
        pending.wait()
    _on_rank0(lambda: _prepare(path, tmp), process_group)
    if meta["optimizer"]:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    if asynchronous:
        written = _dcp(dcp.async_save, state, tmp, _async_group(process_group))
        written = getattr(written, "upload_completion", written)  # torch's AsyncSaveResponse with async staging
        _PENDING[final] = AsyncCheckpoint(final, written, lambda: _commit(tmp, final, meta), process_group)
        return _PENDING[final]
    _dcp(dcp.save, state, tmp, process_group)
    return _on_rank0(lambda: _commit(tmp, final, meta), process_group)  # every rank returns once committed


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint ``path/step_<N>`` (largest N), or None when there is none.

    Directories still being written (``.tmp``) or lacking DCP's ``.metadata`` or dsx's metadata file are ignored.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in path.iterdir()
             if (m := STEP_DIR.fullmatch(p.name)) and (p / META).is_file() and (p / ".metadata").is_file()]
    return max(steps)[1] if steps else None


def _resolve(path: Path) -> tuple[Path, dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"load_checkpoint: path: {path} does not exist")
    ckpt = path if (path / META).is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"load_checkpoint: path: no complete checkpoint (step_<N> with {META}) in {path}")
    return ckpt, read_tagged_json(ckpt / META, caller="load_checkpoint", tag=(FORMAT, VERSION),
                                  what="a dsx checkpoint")


def _mismatch(ckpt: Path, meta: dict[str, Any], model: nn.Module, state: dict[str, Any]) -> str | None:
    """Why the checkpoint's tensors do not fit ``state`` (the model's, and the optimizer's), None when they do."""
    try:  # a refusal is a message, so every rank raises it together
        dcp_meta = SafeReader(ckpt).read_metadata()
        check_entries(ckpt, dcp_meta)
    except ValueError as e:
        return str(e)
    saved = dcp_meta.state_dict_metadata
    problems = []
    ours = {f"model.{k}": v for k, v in state["model"].items()}
    theirs = {k for k in saved if k.startswith("model.")}
    if missing := sorted(set(ours) - theirs):
        problems.append(f"missing from the checkpoint: {[k[6:] for k in missing]}")
    if unexpected := sorted(theirs - set(ours)):
        problems.append(f"not in the model: {[k[6:] for k in unexpected]}")
    for key in sorted(set(ours) & theirs):
        mine, md = ours[key], saved[key]
        if isinstance(mine, torch.Tensor) and isinstance(md, TensorStorageMetadata):
            if tuple(mine.shape) != tuple(md.size) or mine.dtype != md.properties.dtype:
                problems.append(f"{key[6:]}: saved {md.properties.dtype} {tuple(md.size)}, model has {mine.dtype} "
                                f"{tuple(mine.shape)}")
    if problems:
        names = [e["transform"] for e in meta.get("history", [])]
        return (f"load_checkpoint: model: {ckpt} does not fit the model ({'; '.join(problems)}); it was saved from "
                f"a model transformed by {names}, this one by {[e['transform'] for e in history(_unwrap(model))]}")
    if "optim" in state:
        ours = {f"optim.state.{fqn}.{k}" for fqn, s in state["optim"]["state"].items() for k in s}
        theirs = {k for k in saved if k.startswith("optim.state.")}
        if ours != theirs:
            return (f"load_checkpoint: optimizer: {ckpt} holds another optimizer's state (only saved: "
                    f"{sorted(theirs - ours)[:4]}, only expected: {sorted(ours - theirs)[:4]}; first 4 shown)")
    return None


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    process_group: Any = None) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` into ``model`` (and ``optimizer``), in place.

    ``path`` is one checkpoint (``.../step_<N>``) or the directory holding them, where the newest complete one is
    taken (``latest_checkpoint``; rank 0 picks it for every rank). ``model`` must have the saved structure: build it
    the same way (same dsx transforms) before loading. Returns ``{"step", "extra", "path"}``. Raises
    ``FileNotFoundError`` naming ``path`` when there is no checkpoint, ``ValueError`` when the model or optimizer does
    not fit (on every rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    path = check_path("path", path)
    ckpt, meta = _on_rank0(lambda: _resolve(path), process_group)
    with_optimizer = optimizer is not None and meta["optimizer"]
    if with_optimizer:
        before = optimizer.state_dict()  # get_state_dict fills an empty optimizer's state: undone on a mismatch
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    try:
        _everywhere(_mismatch(ckpt, meta, model, state), process_group)
    except ValueError:
        if with_optimizer:
            optimizer.load_state_dict(before)
        raise
    _dcp(dcp.load, state, ckpt, process_group, storage_reader=SafeReader(ckpt), planner=SafeLoadPlanner())
    if with_optimizer:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    return {"step": meta["step"], "extra": meta["extra"], "path": ckpt}
