"""Unstructured magnitude pruning: mask the smallest |w| of linear and conv weights (dsx masks, kept in training).

``scope="local"`` prunes each layer by ``amount``; ``"global"`` ranks all eligible weights against one threshold.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.parametrize import type_before_parametrizations

from dsx.compress.masks import apply_mask, get_mask, source
from dsx.core.checks import matches

IMPORTANCES = ("l1", "l2")
SCOPES = ("local", "global")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_prunable(module: nn.Module) -> bool:
    """``nn.Linear``, ``nn.Conv1d/2d/3d`` or Hugging Face ``Conv1D`` (also once masked)."""
    return isinstance(module, PRUNABLE) or type_before_parametrizations(module).__name__ == "Conv1D"


def select_layers(model: nn.Module, candidate: Callable[[nn.Module], bool], skip: Sequence[str],
                  layers: Sequence[str] | None, who: str) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The candidate modules to mask by name, and the candidates left alone with the reason.

    ``layers`` names exactly the modules to take (a replayed history); otherwise every candidate not matched by a
    ``skip`` pattern, with a floating-point weight that no other module shares (tied weights are left dense).
    """
    refs = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, m in model.named_modules():
        if not candidate(m):
            continue
        if layers is not None:
            if name in layers:
                chosen[name] = m
            continue
        weight = source(m)
        if any(matches(name, p) for p in skip):
            skipped[name] = "skip"
        elif not weight.is_floating_point():
            skipped[name] = "weight is not floating point"
        elif refs[id(weight)] > 1:
            skipped[name] = "weight is shared with another module (tied)"
        else:
            chosen[name] = m
    if layers is not None and (missing := sorted(set(layers) - set(chosen))):
        raise ValueError(f"layers: {missing} are not layers {who} can mask in this model")
    for p in skip:
        if not any(matches(name, p) for name, _ in model.named_modules()):
            warnings.warn(f"{who}: skip pattern {p!r} matches no module", stacklevel=5)
    return chosen, skipped


def magnitude_scores(module: nn.Module) -> torch.Tensor:
    """|w| of the effective weight in float32, with entries already masked at -1 so they are pruned first."""
    scores = source(module).detach().abs().float()
    mask = get_mask(module)
    return scores if mask is None else scores.masked_fill(~mask, -1.0)


def lowest_k_masks(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks (True = kept) pruning exactly the ``k`` lowest scores over all the tensors together."""
    keep = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k <= 0:
        return keep
    device = scores[0].device if len({s.device for s in scores}) == 1 else torch.device("cpu")
    flat = torch.cat([s.reshape(-1).to(device) for s in scores])
    threshold = flat.kthvalue(k).values
    ties = k - int((flat < threshold).sum())
    for s, kept in zip(scores, keep):
        t = threshold.to(s.device)
        kept.copy_(s > t)
        tied = (s == t).reshape(-1).nonzero().squeeze(1)
        spare = tied[min(ties, tied.numel()):]
        ties -= tied.numel() - spare.numel()
        kept.view(-1)[spare] = True
    return keep


def magnitude_prune(modules: dict[str, nn.Module], amount: float, scope: str = "local") -> None:
    """Mask ``modules`` in place so a fraction ``amount`` of their weights is zero (already-pruned entries count and
    stay pruned): per layer (``"local"``) or ranked over all of them (``"global"``)."""
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    scores = {n: magnitude_scores(m) for n, m in modules.items()}
    if scope == "local":
        masks = {n: lowest_k_masks([s], round(amount * s.numel()))[0] for n, s in scores.items()}
    else:
        total = sum(s.numel() for s in scores.values())
        masks = dict(zip(scores, lowest_k_masks(list(scores.values()), round(amount * total))))
    for n, m in modules.items():
        apply_mask(m, masks[n])
