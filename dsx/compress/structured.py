"""Structured pruning: remove whole channels, MLP neurons and attention heads so layers physically shrink.

The dependency graph says which weight dims shrink together, importance ranks the units of each group, and the
per-group fraction is searched so the parameters removed match ``amount``.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from dsx.compress.depgraph import DepGraph, Group, build_depgraph
from dsx.compress.hf import sync_config
from dsx.compress.hf_layouts import expert_tensors, patch_unit
from dsx.compress.importance import check_importance, group_scores
from dsx.compress.layer_rules import rule_for
from dsx.core.checks import check_positive_int, matches
from dsx.core.inputs import Inputs, run_model, tensor_leaves
from dsx.core.modules import is_hf_conv1d
from dsx.core.transform import eval_mode

SCOPES = ("local", "global")


def _check(amount: Any, importance: Any, scope: Any, round_to: Any, inputs: Any, plan: Any) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(f"amount: expected the fraction of prunable parameters to remove, in [0, 1), got {amount!r}")
    check_importance(importance)
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    check_positive_int("round_to", round_to, optional=True)
    if inputs is None:
        raise ValueError("structured pruning needs example_inputs to trace the layer dependencies")
    if plan is not None and not isinstance(plan, dict):
        raise ValueError(f"plan: expected a dict of group name -> units kept, got {type(plan).__name__}")


class _Sizes:
    """The parameter count as a function of the units kept per group (a group's units all touch tensors alike)."""

    def __init__(self, graph: DepGraph, params: dict[str, torch.Tensor], groups: list[Group]):
        n = np.array([g.size for g in groups], dtype=np.float64)
        group_of = np.full(graph.num_classes, -1)
        for i, g in enumerate(groups):
            group_of[g.classes] = i
        claims = defaultdict(list)
        for c in graph.claims:
            claims[c.tensor].append(c)
        self.fixed = 0
        self.prunable = 0
        self.items: list[tuple[int, list[tuple[float, np.ndarray, int]]]] = []
        for name, p in params.items():
            rows, rest = [], p.numel()
            for c in claims.get(name, ()):
                gi = np.where(c.ids >= 0, group_of[np.maximum(c.ids, 0)], -1)
                coef = np.bincount(gi[gi >= 0], minlength=len(groups)) / np.maximum(n, 1)
                if coef.any():
                    rest //= p.numel() if c.dim is None else p.shape[c.dim]
                    rows.append((float((gi < 0).sum()), coef, c.grouped))
            if rows:
                self.items.append((rest, rows))
                self.prunable += p.numel()
            else:
                self.fixed += p.numel()

    def numel(self, kept: np.ndarray) -> int:
        return self.fixed + int(sum(rest * math.prod((f + coef @ kept) / div for f, coef, div in rows)
                                    for rest, rows in self.items))


def _allowed(g: Group, round_to: int | None, multiple: int) -> np.ndarray:
    """The unit counts ``g`` may keep: multiples of the step (round_to channels, equal blocks, the ``multiple`` its
    layout asks), or all of them."""
    step = round_to // math.gcd(round_to, g.width) if round_to else 1
    step = math.lcm(step, g.nblocks, multiple)
    return np.append(np.arange(step, g.size, step), g.size)


def _snap(values: np.ndarray, x: float) -> int:
    return int(values[np.abs(values - x).argmin()])


def _search(counts_at: Callable[[float], np.ndarray], lo: float, hi: float,
            error: Callable[[np.ndarray], float]) -> np.ndarray:
    """Bisect ``x`` in [lo, hi] (removal grows with x) for the counts whose removal is closest to the target."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if error(counts_at(mid)) < 0 else (lo, mid)
    return min((counts_at(lo), counts_at(hi)), key=lambda k: abs(error(k)))


def _refine(kept: np.ndarray, allowed: list[np.ndarray], error: Callable[[np.ndarray], float]) -> np.ndarray:
    """Move single groups one allowed step (each at most once) while that brings removal closer to the target."""
    kept, moved = kept.copy(), set()
    while True:
        best, best_err = None, abs(error(kept))
        for i, values in enumerate(allowed):
            if i in moved:
                continue
            j = int(np.searchsorted(values, kept[i]))
            for jj in (j - 1, j + 1):
                if 0 <= jj < len(values):
                    trial = kept.copy()
                    trial[i] = values[jj]
                    if abs(err := error(trial)) < best_err - 1e-9:
                        best, best_err = (i, trial), abs(err)
        if best is None:
            return kept
        moved.add(best[0])
        kept = best[1]


def _choose(groups: list[Group], scores: list[np.ndarray], allowed: list[np.ndarray], scope: str,
            error: Callable[[np.ndarray], float]) -> np.ndarray:
    """Units kept per group: one fraction for all (local) or one threshold on normalized scores (global)."""
    sizes = np.array([g.size for g in groups], dtype=np.float64)
    if scope == "local":
        kept = _search(lambda f: np.array([_snap(a, n * (1 - f)) for a, n in zip(allowed, sizes)]), 0.0, 1.0, error)
    else:
        normed = [s / s.mean() if s.mean() > 0 else np.ones_like(s) for s in scores]
        top = max(float(s.max()) for s in normed) + 1.0
        kept = _search(lambda t: np.array([_snap(a, max(1, int((s > t).sum()))) for a, s in zip(allowed, normed)]),
                       -1.0, top, error)
    return _refine(kept, allowed, error)


def _pick(g: Group, k: int, score: np.ndarray | None) -> np.ndarray:
    """The ``k`` units of ``g`` to keep: the highest scored (the first ones without scores), evenly per block."""
    blocks = np.zeros(g.size, dtype=np.int64) if g.blocks is None else g.blocks
    per_block = k // (int(blocks.max()) + 1)
    chosen = []
    for b in np.unique(blocks):
        members = np.flatnonzero(blocks == b)
        order = members if score is None else members[np.argsort(-score[members], kind="stable")]
        chosen.append(order[:per_block])
    return g.classes[np.sort(np.concatenate(chosen))]


def _shrink_grouped(t: torch.Tensor, keep: np.ndarray, groups: int) -> torch.Tensor:
    """A grouped conv weight [out, in / groups, ...] keeping, per group, its kept input channels."""
    keep = keep.reshape(groups, t.shape[1])
    rows = t.reshape(groups, t.shape[0] // groups, *t.shape[1:])
    return torch.cat([rows[j][:, torch.as_tensor(np.flatnonzero(keep[j]), device=t.device)] for j in range(groups)])


def _shrink_elements(t: torch.Tensor, keep: np.ndarray, name: str) -> torch.Tensor:
    """A loose parameter keeping whole slabs: the removed elements must form whole rows / columns."""
    slabs = [keep.any(axis=tuple(i for i in range(keep.ndim) if i != d)) for d in range(keep.ndim)]
    whole = np.ones_like(keep)
    for d, s in enumerate(slabs):
        whole &= s.reshape([-1 if i == d else 1 for i in range(keep.ndim)])
    if not np.array_equal(whole, keep):
        raise ValueError(f"structured pruning cannot shrink {name}: the channels removed from it do not form whole "
                         "rows or columns; pass skip=[...] for the layers around it")
    for d, s in enumerate(slabs):
        t = t.index_select(d, torch.as_tensor(np.flatnonzero(s), device=t.device))
    return t


def _shrink(model: nn.Module, graph: DepGraph, keep_class: np.ndarray) -> None:
    """Cut every claimed dim to its kept positions, swap the new tensors in (shared ones stay shared) and let each
    touched layer's rule resize it."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    claims = defaultdict(list)
    for c in graph.claims:
        claims[c.tensor].append(c)
    new: dict[int, torch.Tensor] = {}
    for name, cs in claims.items():
        t = tensors[name].detach()
        for c in sorted(cs, key=lambda c: c.grouped > 1):
            keep = (c.ids < 0) | keep_class[np.maximum(c.ids, 0)]
            if keep.all():
                continue
            if c.dim is None:
                t = _shrink_elements(t, keep.reshape(t.shape), name)
            elif c.grouped > 1:
                t = _shrink_grouped(t, keep, c.grouped)
            else:
                t = t.index_select(c.dim, torch.as_tensor(np.flatnonzero(keep), device=t.device))
        if t.shape != tensors[name].shape:
            new[id(tensors[name])] = t
    made: dict[int, torch.Tensor] = {}
    for m in model.modules():
        touched = False
        for store in (m._parameters, m._buffers):
            for k, v in store.items():
                if v is not None and id(v) in new:
                    if id(v) not in made:
                        made[id(v)] = nn.Parameter(new[id(v)], v.requires_grad) if isinstance(v, nn.Parameter) \
                            else new[id(v)]
                    store[k], touched = made[id(v)], True
        if touched and (rule := rule_for(m)) is not None:
            rule.resize(m)


def _check_runs(model: nn.Module, inputs: Inputs, shapes: list[tuple[int, ...]]) -> None:
    try:
        with eval_mode(model):
            out = run_model(model, inputs, name="example_inputs (pruned model)")
    except ValueError as e:
        raise ValueError(f"structured pruning left a model that fails: {e}. Some layer probably hard-codes a channel "
                         "count the dependency graph cannot see; pass skip=[...] for it") from e
    got = [tuple(t.shape) for t in tensor_leaves(out)]
    if got != shapes:
        raise ValueError(f"structured pruning changed the output shapes from {shapes} to {got}; pass skip=[...] "
                         "for the layers that feed the outputs")


def block_linear_weights(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, int]:
    """The sizes of the linear weights inside a model's repeated blocks, the ones structured pruning aims at.

    A block is anything under an ``nn.ModuleList`` (a transformer's layers); its linear weights are those of
    ``nn.Linear`` and Hugging Face ``Conv1D`` layers and MoE expert tensors. Embeddings, the LM head, poolers and
    classifiers live outside the blocks and do not count, nor do modules matched by ``skip``.

    Args:
        model: the model.
        skip: module names or ``"re:<regex>"`` patterns left out, as in ``prune_structured``.

    Returns:
        Parameter name -> number of elements.
    """
    blocks = [f"{n}." for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    sizes = {}
    for name, m in model.named_modules():
        if any(name.startswith(b) for b in blocks) and not any(matches(name, p) for p in skip):
            for t in ("weight",) if isinstance(m, nn.Linear) or is_hf_conv1d(m) else expert_tensors(m):
                sizes[f"{name}.{t}"] = getattr(m, t).numel()
    return sizes


def _warn_short(amount: float, ratio: float, linear_ratio: float | None, skipped: dict[str, str],
                linears: dict[str, int]) -> None:
    """Warn when the parameters removed fall more than 5 points short of ``amount``, naming the groups inside the
    blocks that could not be pruned, one per reason."""
    short = [f"{r:.1%} of the {what}" for r, what in ((ratio, "prunable parameters"),
                                                      (linear_ratio, "linear weights in the model's blocks"))
             if r is not None and r < amount - 0.05]
    if not short:
        return
    reasons: dict[str, list[str]] = defaultdict(list)
    for key, why in skipped.items():
        if any(n.startswith(f"{key}.") for n in linears):
            reasons[why].append(key)
    named = "; ".join(f"{keys[0]}{f' (and {len(keys) - 1} more)' if len(keys) > 1 else ''}: {why}"
                      for why, keys in reasons.items())
    warnings.warn(f"structured pruning removed {' and '.join(short)}, short of amount={amount}"
                  f"{f'; cannot be pruned: {named}' if named else ''} (see the report's 'skipped')", stacklevel=3)


def _from_plan(plan: dict[str, int], groups: list[Group], skipped: dict[str, str]) -> dict[str, int]:
    by_key = {g.key: g for g in groups}
    for key, k in plan.items():
        if key in skipped:
            raise ValueError(f"plan: group {key!r} cannot be pruned here: {skipped[key]}")
        if key not in by_key:
            raise ValueError(f"plan: this model has no group {key!r} (groups: {sorted(by_key)})")
        g = by_key[key]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= g.size or k % g.nblocks:
            raise ValueError(f"plan: {key!r} must keep a whole number of units in [1, {g.size}]"
                             f"{f' divisible by {g.nblocks}' if g.nblocks > 1 else ''}, got {k!r}")
    return {g.key: plan.get(g.key, g.size) for g in groups}


def prune_structured(model: nn.Module, amount: float, inputs: Inputs, *, importance: str = "l1", scope: str = "local",
                     round_to: int | None = None, skip: Sequence[str] = (), calibration: Iterable | None = None,
                     plan: dict[str, int] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Remove whole channels / neurons / heads from ``model`` in place; return it with a JSON-able report.

    ``amount``: fraction of the prunable parameters (those in layers that can shrink) to remove. ``importance``:
    "l1", "l2", "taylor" (|w * grad| of the summed outputs on ``calibration`` batches, else the example inputs) or
    "bn_scale" (|gamma| of the group's BatchNorms, l1 without one). ``scope="local"`` prunes every group by the
    same fraction, ``"global"`` ranks normalized importance across groups. ``round_to`` keeps pruned widths
    multiples of it; ``skip`` names modules (or ``"re:<regex>"``) whose channels stay. ``plan`` (from a previous
    report) shrinks each group to exactly that many units, keeping the first ones, without ranking.

    The report: ``plan`` (group -> units kept: channels, neurons, heads, or KV groups under grouped-query
    attention), ``original`` (group -> units before), ``params_before`` / ``params_after`` / ``prunable_params``,
    ``ratio`` (parameters removed / prunable ones), ``ratio_total`` (/ all), ``linear_ratio`` (/ the linear weights
    in the model's blocks, see ``block_linear_weights``; None without blocks), ``groups`` (count), ``pruned``
    (groups shrunk), ``skipped`` (group -> reason), ``attention`` (module -> heads kept), ``config`` (changes).
    Either ratio more than 5 points short of ``amount`` warns, naming what could not be pruned.
    """
    _check(amount, importance, scope, round_to, inputs, plan)
    graph = build_depgraph(model, inputs, skip=skip)
    skipped = {g.key: g.reason for g in graph.groups if g.reason}
    groups, allowed = [], []
    for g in graph.groups:
        if g.reason is None:
            layout = graph.layouts.get(g.key)
            values = _allowed(g, round_to if plan is None else None, layout.multiple if layout else 1)
            if len(values) > 1:
                groups.append(g)
                allowed.append(values)
            else:
                skipped[g.key] = f"round_to={round_to} leaves no smaller width than its {g.size * g.width} channels"
    params = dict(model.named_parameters())
    sizes = _Sizes(graph, params, groups)
    full = np.array([g.size for g in groups], dtype=np.float64)
    if plan is not None:
        counts = _from_plan(plan, groups, skipped)
        kept = [_pick(g, counts[g.key], None) for g in groups]
    else:
        target = sizes.numel(full) - amount * sizes.prunable

        def error(k: np.ndarray) -> float:  # parameters removed minus the target
            return target - sizes.numel(k)

        if groups and amount > 0:
            scores = group_scores(model, graph, groups, importance, inputs, calibration)
            counts = _choose(groups, scores, allowed, scope, error)
            kept = [_pick(g, int(k), s) for g, k, s in zip(groups, counts, scores)]
        else:
            kept = [g.classes for g in groups]
    keep_class = np.ones(graph.num_classes, dtype=bool)
    for g, members in zip(groups, kept):
        keep_class[g.classes] = False
        keep_class[members] = True
    before = sum(p.numel() for p in params.values())
    linear_before = block_linear_weights(model, skip)
    _shrink(model, graph, keep_class)
    attention = {name: heads for name in graph.layouts if (heads := patch_unit(model.get_submodule(name)))}
    config = sync_config(model, attention)
    _check_runs(model, inputs, graph.output_shapes)
    after = sum(p.numel() for p in model.parameters())
    ratio = (before - after) / max(sizes.prunable, 1)
    linear_after = block_linear_weights(model, skip)
    linear_ratio = 1 - sum(linear_after.values()) / sum(linear_before.values()) if linear_before else None
    if plan is None:
        _warn_short(amount, ratio, linear_ratio, skipped, linear_before)
    return model, {
        "plan": {g.key: len(m) for g, m in zip(groups, kept)},
        "original": {g.key: g.size for g in groups},
        "params_before": before,
        "params_after": after,
        "prunable_params": sizes.prunable,
        "ratio": round(ratio, 4),
        "ratio_total": round((before - after) / max(before, 1), 4),
        "linear_ratio": None if linear_ratio is None else round(linear_ratio, 4),
        "groups": len(graph.groups),
        "pruned": sum(len(m) < g.size for g, m in zip(groups, kept)),
        "skipped": skipped,
        "attention": attention,
        "config": config,
    }
