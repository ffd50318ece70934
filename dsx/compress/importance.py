"""Channel importance for structured pruning: one score per prunable unit (channel, neuron, head) of each group.

Scores sum over every weight a unit touches (its coupled layers): L1 / L2 norms, first-order Taylor |w * grad| from
calibration batches, or the |gamma| of the group's BatchNorms.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from dsx.compress.depgraph import Claim, DepGraph, Group
from dsx.core.inputs import Inputs, take_batches, tensor_leaves
from dsx.core.transform import eval_mode

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale")


def check_importance(importance: Any) -> str:
    if importance not in IMPORTANCES:
        raise ValueError(f"importance: expected one of {IMPORTANCES}, got {importance!r}")
    return importance


def _per_position(x: torch.Tensor, claim: Claim) -> np.ndarray:
    """Sum ``x`` (a per-element score of the claimed tensor) over everything but the claimed positions."""
    x = x.detach().double().cpu()
    if claim.dim is None:
        return x.reshape(-1).numpy()
    if claim.grouped > 1:  # a grouped conv weight [out, in / groups, ...]: positions are the full input channels
        g = claim.grouped
        return x.reshape(g, x.shape[0] // g, x.shape[1], -1).sum((1, 3)).reshape(-1).numpy()
    return x.movedim(claim.dim, 0).reshape(x.shape[claim.dim], -1).sum(1).numpy()


def _gradients(model: nn.Module, batches: Iterable[Inputs], needed: set[str]) -> dict[str, torch.Tensor]:
    """Accumulated |w * dL/dw| over ``batches``, L = the sum of the model's floating-point outputs."""
    params = dict(model.named_parameters())
    state = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    scores = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in needed}
    seen = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with eval_mode(model), torch.enable_grad():
            for args, kwargs in batches:
                outs = [t for t in tensor_leaves(model(*args, **kwargs)) if t.is_floating_point() and t.requires_grad]
                if not outs:
                    raise ValueError("importance='taylor': the model's outputs carry no gradient")
                sum(t.float().sum() for t in outs).backward()
                for n in needed:
                    if params[n].grad is not None:
                        scores[n] += (params[n].detach() * params[n].grad).abs().double()
                    params[n].grad = None
                seen += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(state[n][0])
            p.grad = state[n][1]
    if not seen:
        raise ValueError("calibration: no batches (expected an iterable of example inputs)")
    return scores


def group_scores(model: nn.Module, graph: DepGraph, groups: list[Group], importance: str, inputs: Inputs,
                 calibration: Iterable[Any] | None = None) -> list[np.ndarray]:
    """Per group, a score per unit (in the group's order): higher is more important."""
    check_importance(importance)
    params = dict(model.named_parameters())
    used = {ci for g in groups for ci, _ in g.footprint if graph.claims[ci].tensor in params
            and graph.claims[ci].role != "stat"}
    if importance == "bn_scale":
        bn = {ci for ci in used if graph.claims[ci].role == "bn_weight"}
        scored = [g for g in groups if any(ci in bn for ci, _ in g.footprint)]
        fallback = [g for g in groups if g not in scored]
        scores = dict(zip(map(id, scored), _scores(params, graph, scored, bn, "l1", None)))
        scores.update(zip(map(id, fallback), _scores(params, graph, fallback, used, "l1", None)))
        return [scores[id(g)] for g in groups]
    grads = None
    if importance == "taylor":
        batches = [inputs] if calibration is None else take_batches(calibration)
        grads = _gradients(model, batches, {graph.claims[ci].tensor for ci in used})
    return _scores(params, graph, groups, used, importance, grads)


def _scores(params: dict[str, torch.Tensor], graph: DepGraph, groups: list[Group], claims: set[int], metric: str,
            grads: dict[str, torch.Tensor] | None) -> list[np.ndarray]:
    total = np.zeros(graph.num_classes)
    for ci in sorted({ci for g in groups for ci, _ in g.footprint if ci in claims}):
        c = graph.claims[ci]
        w = params[c.tensor].detach()
        x = grads[c.tensor] if grads is not None else w.abs() if metric == "l1" else w.double() ** 2
        per = _per_position(x, c)
        valid = c.ids >= 0
        by_class = np.bincount(c.ids[valid], weights=per[valid], minlength=graph.num_classes)
        total += np.sqrt(by_class) if metric == "l2" else by_class
    return [total[g.classes] for g in groups]
