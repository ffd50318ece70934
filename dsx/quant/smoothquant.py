"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights with per-channel scales,
so activations become easier to quantize while the layer computes the same function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

SCALE_MIN, SCALE_MAX = 1e-5, 1e5


def _weight_absmax(weight: Tensor | Sequence[Tensor]) -> Tensor:
    weights = [weight] if isinstance(weight, Tensor) else list(weight) if isinstance(weight, Sequence) else None
    if not weights or not all(isinstance(w, Tensor) and w.dim() == 2 for w in weights):
        raise TypeError("weight: expected a 2-D Tensor [out_features, in_features] or a non-empty sequence of them")
    if len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"weight: the weights disagree on in_features: {[tuple(w.shape) for w in weights]}")
    return torch.cat([w.detach().abs().amax(0, keepdim=True).to(torch.float64) for w in weights]).amax(0)


def smoothing_scales(act_absmax: Tensor, weight: Tensor | Sequence[Tensor], alpha: float = 0.5) -> Tensor:
    """Per-input-channel scales ``s_j = max|X_j|**alpha / max|W[:, j]|**(1 - alpha)`` (float32, shape [K]).

    ``act_absmax`` [K] is the calibrated per-channel max ``|x|`` (``ChannelAbsMax``); ``weight`` is a Linear's
    [N, K] weight, or several that read the same input (q, k, v projections), whose column maxima are combined.
    A channel whose activation or weight column is all zero gets ``s = 1``; the rest are clamped to
    ``[1e-5, 1e5]``, so the result is finite and positive. ``alpha`` in [0, 1] sets how much of the difficulty
    moves to the weights (0.5 balances them).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    if not isinstance(act_absmax, Tensor) or act_absmax.dim() != 1:
        got = f"shape {tuple(act_absmax.shape)}" if isinstance(act_absmax, Tensor) else type(act_absmax).__name__
        raise TypeError(f"act_absmax: expected a 1-D Tensor (one max per input channel), got {got}")
    w_max = _weight_absmax(weight)
    if act_absmax.numel() != w_max.numel():
        raise ValueError(f"act_absmax: expected {w_max.numel()} channels (the weight's in_features), "
                         f"got {act_absmax.numel()}")
    a_max = act_absmax.detach().to(device=w_max.device, dtype=torch.float64)
    if not bool(torch.isfinite(a_max).all()) or bool((a_max < 0).any()):
        raise ValueError("act_absmax: expected finite non-negative values")
    if not bool(torch.isfinite(w_max).all()):
        raise ValueError("weight: contains NaN or inf")
    live = (a_max > 0) & (w_max > 0)
    scales = a_max.clamp(min=SCALE_MIN).pow(alpha) / w_max.clamp(min=SCALE_MIN).pow(1 - alpha)
    return torch.where(live, scales.clamp(SCALE_MIN, SCALE_MAX), 1.0).to(torch.float32)


def smooth_linear(linear: nn.Linear, scales: Tensor) -> None:
    """Multiply ``linear``'s weight columns by ``scales`` in place; the caller divides the input by ``scales``.

    Exact in real arithmetic: ``x @ W.T == (x / s) @ (W * s).T`` (``W * s`` scales column j by ``s_j``), and the
    bias is unchanged.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
    if not isinstance(scales, Tensor) or scales.shape != (linear.in_features,):
        got = f"shape {tuple(scales.shape)}" if isinstance(scales, Tensor) else type(scales).__name__
        raise ValueError(f"scales: expected a Tensor of shape ({linear.in_features},), got {got}")
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        raise ValueError("scales: expected finite positive values")
    with torch.no_grad():
        linear.weight.mul_(scales.to(device=linear.weight.device, dtype=linear.weight.dtype))
