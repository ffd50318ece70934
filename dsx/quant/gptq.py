"""GPTQ (Frantar et al., 2022) for ``int4_weight_only``: calibrated 4-bit codes whose rounding error is compensated
column by column through the inverse Hessian of each layer's inputs, so the layer's outputs (not weights) stay close.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from dsx.core.checks import check_positive_int, check_positive_number
from dsx.quant.int4 import QMAX, minmax_params
from dsx.core.modules import is_hf_conv1d
from dsx.quant.linear import linear_weight

CHOLESKY_RETRIES = 4  # damping tries: damp, 10 damp, 100 damp, 1000 damp


class _Stop(Exception):
    """Raised by the capture hook to end a forward once block 0's inputs are recorded."""


class Hessian:
    """Running ``H = 2 / n * sum x x^T`` over the rows ``x`` (the last dim) of a linear layer's inputs.

    Args:
        in_features: the layer's input size K (H is [K, K]).
        device: where H lives. dtype: the accumulation dtype (float32 or float64).
    """

    def __init__(self, in_features: int, device: Any = None, dtype: torch.dtype = torch.float32) -> None:
        self.h = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs.

        Args:
            x: inputs [..., K] (any leading dims; each row is one sample).

        Raises:
            ValueError: ``x`` holds NaN or inf ("calibration: ..."), or its last dim is not K.
        """
        k = self.h.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"x: expected inputs with last dim {k}, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, k).to(device=self.h.device, dtype=self.h.dtype)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration: a linear layer's inputs hold NaN or inf")
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        self.h.mul_(self.n / total)
        x = x * (2.0 / total) ** 0.5
        self.h.addmm_(x.t(), x)
        self.n = total


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag) * I)^-1``, raising damping 10x on failure."""
    mean = h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for attempt in range(CHOLESKY_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10 ** attempt) * mean * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper
    raise ValueError(f"calibration: the Hessian is not positive definite even with damp={damp * 10 ** attempt:g}; "
                     "calibrate on more (or more varied) data")


def gptq_quantize(weight: torch.Tensor, hessian: Hessian | torch.Tensor, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = False,
                  block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize one weight to int4 codes with GPTQ's error compensation.

    Each group's scale and zero (min-max over its ``group_size`` input columns) come from the weights as updated by
    the error of the columns quantized before it; with ``act_order`` columns go by decreasing Hessian diagonal while
    groups stay those of the original column order.

    Args:
        weight: float [N, K]. hessian: a ``Hessian`` or its [K, K] matrix.
        group_size: input columns per scale/zero (divides K). damp: diagonal damping, a fraction of mean(diag(H)).
        act_order: quantize the most salient columns first. block_size: columns per lazy batch update.

    Returns:
        ``(q, scale, zero)``: uint8 codes [N, K] in 0..15, float32 scale and zero [N, K / group_size], in the
        original column order; the weight is ``(q - zero) * scale`` per group.

    Raises:
        ValueError: bad arguments (the message names the argument), or "calibration: ..." when the damped Hessian
            stays indefinite.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [N, K] tensor, got {getattr(weight, 'shape', type(weight))}")
    n, k = weight.shape
    if type(group_size) is not int or group_size < 1 or k % group_size:
        raise ValueError(f"group_size: expected a positive int dividing K={k}, got {group_size!r}")
    check_positive_number("damp", damp)
    check_positive_int("block_size", block_size)
    h = hessian.h if isinstance(hessian, Hessian) else hessian
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (k, k):
        raise ValueError(f"hessian: expected a [{k}, {k}] matrix, got {getattr(h, 'shape', type(h))}")
    dev = weight.device
    w = weight.detach().to(dev, torch.float32).clone()
    h = h.detach().to(dev, torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = k // group_size
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        where = torch.argsort(perm)  # where[c]: the position of original column c in the permuted order
        group_of = (perm // group_size).tolist()
    else:
        perm = where = torch.arange(k, device=dev)
        group_of = [c // group_size for c in range(k)]
    hinv = _inverse_cholesky(h, float(damp))
    q = torch.zeros(n, k, dtype=torch.uint8, device=dev)
    scale = torch.zeros(n, groups, dtype=torch.float32, device=dev)
    zero = torch.zeros(n, groups, dtype=torch.float32, device=dev)
    done = [False] * groups
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if not done[g]:  # first column of group g reached: its other columns all lie at positions >= i1 + i
                pos = where[g * group_size:(g + 1) * group_size]
                cur = w[:, pos] - err1[:, :i] @ hinv[i1:i1 + i][:, pos] if i else w[:, pos]
                s, z = minmax_params(cur, group_size)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                done[g] = True
            s, z = scale[:, g], zero[:, g]
            col = w1[:, i]
            code = torch.round(col / s + z).clamp_(0, QMAX)
            q[:, i1 + i] = code.to(torch.uint8)
            e = (col - (code - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return (q[:, where] if act_order else q), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that codes ``q`` [N, K] and ``scale``/``zero`` [N, groups] stand for."""
    n, groups = scale.shape
    return ((q.float().view(n, groups, -1) - zero[..., None]) * scale[..., None]).view(n, -1)


def _find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's largest ``nn.ModuleList`` (its decoder layers), or None if it has none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=len) if lists else None


def _call(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` / ``model(batch)`` / ``model(*args, **kwargs)``, with use_cache=False where accepted."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], tuple) \
            and isinstance(batch[1], dict):
        args, kwargs = tuple(batch[0]), dict(batch[1])
    elif isinstance(batch, dict):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params:
        kwargs.setdefault("use_cache", False)
    return model(*args, **kwargs)


def _capture(model: nn.Module, block: nn.Module, batches: list[Any]) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` that ``block`` receives for each batch (the forward stops there)."""
    seen: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _call(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def _next_inputs(inputs: tuple[tuple, dict], out: Any) -> tuple[tuple, dict]:
    """Block inputs with the hidden states replaced by the block's output ``out``."""
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _calibrate(linears: dict[str, nn.Module], run: Any) -> dict[str, Hessian]:
    """Hessians of the ``linears`` called while ``run()`` executes (those never called are left out)."""
    hessians: dict[str, Hessian] = {}
    handles = []
    for name, lin in linears.items():
        def hook(module: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            x = args[0]
            if name not in hessians:
                w = linear_weight(module)[0]
                hessians[name] = Hessian(w.shape[1], device=w.device)
            hessians[name].add(x)
        handles.append(lin.register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: hess for name, hess in hessians.items() if hess.n}


def _quantize_into(linears: dict[str, nn.Module], hessians: dict[str, Hessian], result: dict[str, Any],
                   **kwargs: Any) -> None:
    """GPTQ each calibrated linear, record its codes and write its dequantized weight into it in place."""
    for name, hess in hessians.items():
        lin = linears[name]
        q, scale, zero = gptq_quantize(linear_weight(lin)[0], hess, **kwargs)
        result[name] = (q, scale, zero)
        deq = dequantize(q, scale, zero)
        lin.weight.data.copy_((deq.t() if is_hf_conv1d(lin) else deq).to(lin.weight.dtype))


@torch.no_grad()
def gptq_sequential(model: nn.Module, batches: list[Any], linears: dict[str, nn.Module], group_size: int = 128,
                    damp: float = 0.01, act_order: bool = False,
                    progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ the ``linears`` of ``model`` block by block, so each block calibrates on the outputs of the already
    quantized blocks before it.

    The blocks are the model's largest ``nn.ModuleList`` (a decoder's layers): block 0's inputs are captured once
    per batch, each block is run with Hessian hooks on its linears, they are quantized, their dequantized weights
    written in, and the block rerun to give the next block's inputs (one block's inputs are held at a time).
    Linears outside the blocks (e.g. ``lm_head``) are calibrated afterwards with one full forward per batch through
    the quantized blocks. Without a ``ModuleList`` the whole model is one block. Every original weight is restored
    before returning; linears never called are left out of the result.

    Args:
        model: the float model. batches: calibration batches (tensors for ``model(x)``, dicts for
            ``model(**batch)``, tuples of positional inputs or ``(args, kwargs)`` pairs).
        linears: name -> ``nn.Linear`` (or Hugging Face ``Conv1D``) inside ``model``.
        group_size, damp, act_order: as in ``gptq_quantize``. progress: a tqdm bar over the blocks.

    Returns:
        name -> ``(q, scale, zero)`` for each linear that was called.

    Raises:
        ValueError: bad arguments, or "calibration: ..." for non-finite inputs or an indefinite Hessian.
    """
    check_positive_number("damp", damp)
    check_positive_int("group_size", group_size)
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one calibration batch")
    opts = {"group_size": group_size, "damp": damp, "act_order": act_order}
    originals = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    result: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    blocks = _find_blocks(model)
    try:
        inside: set[str] = set()
        if blocks is not None:
            from tqdm.auto import tqdm

            inputs = _capture(model, blocks[0], batches)
            for block in tqdm(blocks, desc="gptq", disable=not progress):
                members = {id(m) for m in block.modules()}
                mine = {n: lin for n, lin in linears.items() if id(lin) in members}
                inside.update(mine)
                if mine:
                    hessians = _calibrate(mine, lambda: [block(*a, **kw) for a, kw in inputs])
                    _quantize_into(mine, hessians, result, **opts)
                inputs = [_next_inputs((a, kw), block(*a, **kw)) for a, kw in inputs]
            del inputs
        rest = {n: lin for n, lin in linears.items() if n not in inside}
        if rest:
            hessians = _calibrate(rest, lambda: [_call(model, b) for b in batches])
            _quantize_into(rest, hessians, result, **opts)
    finally:
        for name, lin in linears.items():
            lin.weight.data.copy_(originals[name])
    return result
