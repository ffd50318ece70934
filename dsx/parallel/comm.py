"""Compressed gradient communication for DistributedDataParallel: fp16/bf16, int8, top-k and PowerSGD comm hooks.
Gradient traffic often limits data-parallel scaling; each hook counts the bytes it sends against fp32 all-reduce.

Bytes are counted per rank with the bandwidth-optimal ring model: an all-reduce of ``B`` bytes sends ``2 (N-1) B / N``,
an all-gather of ``B`` bytes per rank ``(N-1) B`` and an all-to-all of ``B`` bytes ``(N-1) B / N``, so ``ratio``
compares like with like for any world size ``N``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

SPECS = ("fp16", "bf16", "int8[:chunk=1024]", "topk:FRACTION", "powersgd[:rank=4,start_iter=10]")
"""The spec strings ``compress_gradients`` accepts; options go after a colon, comma-separated."""

_OPTIONS = {"fp16": {}, "bf16": {}, "int8": {"chunk": 1024}, "topk": {"fraction": 0.01},
            "powersgd": {"rank": 4, "start_iter": 10}}


@dataclass
class CommStats:
    """Gradient bytes one rank sent through its hook, and what all-reducing the uncompressed buckets would have sent."""

    spec: str
    world_size: int
    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    steps: int = 0
    nonfinite_buckets: int = 0
    """Buckets that held inf / NaN: sent as NaN at those entries, their error-feedback residual reset to zero."""

    @property
    def ratio(self) -> float:
        """``bytes_uncompressed / bytes_sent``; 1.0 before any traffic (and always at world size 1)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 1.0

    def __str__(self) -> str:
        return (f"{self.spec}: {self.bytes_sent / 1e6:.3f} MB sent vs {self.bytes_uncompressed / 1e6:.3f} MB "
                f"uncompressed ({self.ratio:.2f}x) over {self.steps} steps on {self.world_size} ranks")


NONFINITE = -128
"""The int8 code of an inf / NaN entry (finite values use -127..127): it decodes to NaN."""


def quantize_int8(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale (absmax / 127) per ``chunk`` elements of the last dim (the last may be short).

    The scales cover the finite entries only; an inf / NaN entry gets the code ``NONFINITE`` (decoded as NaN), so it
    reaches the optimizer (and GradScaler) as non-finite without spoiling the rest of its chunk.
    Returns ``(q, scales)``: ``q`` int8 of ``x``'s shape, ``scales`` of shape ``(..., ceil(L / chunk))``.
    """
    length = x.shape[-1]
    chunks = -(-length // chunk)
    blocks = F.pad(x.float(), (0, chunks * chunk - length)).view(*x.shape[:-1], chunks, chunk)
    finite = torch.isfinite(blocks)
    scales = blocks.abs().masked_fill_(~finite, 0).amax(-1) / 127
    q = torch.round(blocks / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).clamp_(-127, 127)
    q = q.masked_fill_(~finite, NONFINITE)
    return q.to(torch.int8).view(*x.shape[:-1], chunks * chunk)[..., :length], scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, chunk: int) -> torch.Tensor:
    """The fp32 tensor ``quantize_int8`` encoded as ``(q, scales)`` (NaN where it was not finite)."""
    length = q.shape[-1]
    blocks = F.pad(q.float(), (0, scales.shape[-1] * chunk - length)).view(*scales.shape, chunk)
    out = (blocks * scales.unsqueeze(-1)).masked_fill_(blocks == NONFINITE, float("nan"))
    return out.view(*q.shape[:-1], -1)[..., :length]


def topk_compress(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``ceil(fraction * numel)`` largest-magnitude entries of flat ``x``: ``(values fp32, indices int32)``."""
    k = min(x.numel(), max(1, math.ceil(round(fraction * x.numel(), 6))))  # 0.1 * 170 is 17.000000000000004
    indices = x.abs().topk(k, sorted=False).indices
    return x[indices].float(), indices.to(torch.int32)


def topk_decompress(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Dense fp32 sum of sparse ``(values, indices)`` rows (one per rank, or a single 1-D pair) of length ``numel``."""
    out = torch.zeros(numel, dtype=torch.float32, device=values.device)
    for v, i in zip(values.view(-1, values.shape[-1]), indices.view(-1, indices.shape[-1])):
        out[i.long()] += v  # indices are unique within a row, rows are added in order: every rank gets the same sum
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"int8:chunk=512"`` -> ``("int8", {"chunk": 512})``, defaults filled in; ValueError naming what is wrong."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string such as 'int8' or 'topk:0.01', got {type(spec).__name__}")
    name, _, rest = spec.strip().lower().partition(":")
    if name not in _OPTIONS:
        raise ValueError(f"unknown gradient compression spec {spec!r}; valid specs: {', '.join(SPECS)}")
    options = dict(_OPTIONS[name])
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = (key.strip(), value.strip()) if eq else ("fraction" if name == "topk" else "", key.strip())
        if key not in options:
            valid = ", ".join(options) or "none"
            raise ValueError(f"unknown option {item!r} in spec {spec!r}; options of {name!r}: {valid}")
        try:
            options[key] = type(options[key])(value)
        except ValueError:
            kind = "an integer" if isinstance(options[key], int) else "a number"
            raise ValueError(f"{name} {key} must be {kind}, got {value!r} in spec {spec!r}") from None
    if name == "topk" and not 0 < options["fraction"] <= 1:
        raise ValueError(f"topk fraction must be in (0, 1], got {options['fraction']} in spec {spec!r}")
    for key, low in (("chunk", 1), ("rank", 1), ("start_iter", 2)):
        if key in options and options[key] < low:
            raise ValueError(f"{name} {key} must be >= {low}, got {options[key]} in spec {spec!r}")
    return name, options


def _allreduce_bytes(nbytes: int, world: int) -> int:
    return 2 * (world - 1) * nbytes // world


class _Hook:
    """Shared state of the comm hooks (group, world size, stats); called itself, it is the world-size-1 pass-through."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats) -> None:
        self.group, self.world, self.stats = group, stats.world_size, stats

    def count(self, bucket: dist.GradBucket, sent: int) -> None:
        buffer = bucket.buffer()
        self.stats.bytes_sent += sent
        self.stats.bytes_uncompressed += _allreduce_bytes(buffer.numel() * buffer.element_size(), self.world)
        self.stats.steps += bucket.is_last()

    def finite(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is all finite; when not, count it and warn once (its residual must then be reset)."""
        if bool(torch.isfinite(x).all()):
            return True
        self.stats.nonfinite_buckets += 1
        if self.stats.nonfinite_buckets == 1:
            warnings.warn(f"compress_gradients({self.stats.spec!r}): a gradient bucket held inf / NaN; those entries "
                          "are sent as NaN and the bucket's error-feedback residual is reset (counted in "
                          "CommStats.nonfinite_buckets)", RuntimeWarning, stacklevel=2)
        return False

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """World size 1: nothing to exchange, the bucket is already the average (bytes stay 0)."""
        self.count(bucket, 0)
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut


def _residual(memory: dict[int, torch.Tensor], key: int, like: torch.Tensor) -> torch.Tensor:
    """The residual kept for bucket ``key``; zeros when new or when DDP rebuilt its buckets and the size changed."""
    if key not in memory or memory[key].numel() != like.numel():
        memory[key] = torch.zeros_like(like)
    return memory[key]


class _Cast(_Hook):
    """torch's fp16_compress_hook / bf16_compress_hook: all-reduce of the bucket cast to 16 bits."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats, dtype: torch.dtype) -> None:
        super().__init__(group, stats)
        self.dtype = dtype
        self.hook = default_hooks.fp16_compress_hook if dtype == torch.float16 else default_hooks.bf16_compress_hook

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self.count(bucket, _allreduce_bytes(bucket.buffer().numel() * self.dtype.itemsize, self.world))
        return self.hook(self.group, bucket)


class _Int8(_Hook):
    """Int8 all-reduce as all-to-all + all-gather, so traffic stays ~1/4 of fp32 all-reduce at any world size.

    The bucket is split into one shard per rank and quantized per chunk; an all-to-all sends shard ``j`` to rank ``j``,
    which dequantizes the N copies, averages and re-quantizes them (a reduce-scatter); an all-gather of the averaged
    shards then gives every rank the same gradient.
    With error feedback each rank keeps its quantization residual for the bucket, and each shard's owner the residual
    of re-quantizing the average, both added back the next step.
    """

    def __init__(self, group: dist.ProcessGroup, stats: CommStats, chunk: int, error_feedback: bool) -> None:
        super().__init__(group, stats)
        self.chunk, self.error_feedback = chunk, error_feedback
        self.residuals: dict[int, torch.Tensor] = {}
        self.shard_residuals: dict[int, torch.Tensor] = {}

    def pack(self, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return torch.cat([q.view(torch.uint8), scales.contiguous().view(torch.uint8)], -1)

    def unpack(self, packed: torch.Tensor, length: int) -> torch.Tensor:
        q, scales = packed[..., :length].view(torch.int8), packed[..., length:].contiguous().view(torch.float32)
        return dequantize_int8(q, scales, self.chunk)

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer, key, world, ef = bucket.buffer(), bucket.index(), self.world, self.error_feedback
        numel = buffer.numel()
        shard = -(-numel // world)
        grad = buffer.to(torch.float32, copy=True)
        if ef:
            grad += _residual(self.residuals, key, grad)
        shards = F.pad(grad, (0, shard * world - numel)).view(world, shard)
        q, scales = quantize_int8(shards, self.chunk)
        if ef:
            self.residuals[key] = ((shards - dequantize_int8(q, scales, self.chunk)).flatten()[:numel]
                                   if self.finite(grad) else torch.zeros_like(grad))
        send = self.pack(q, scales)
        received = torch.empty_like(send)
        self.count(bucket, 2 * (world - 1) * send.shape[1])
        # Waited for here, not chained: a collective started from a future's callback could be issued in a different
        # order on each rank (callbacks of several buckets race on gloo's threads) and pair with the wrong peer.
        dist.all_to_all_single(received, send, group=self.group)
        mean = self.unpack(received, shard).sum(0).div_(world)
        if ef:
            mean += _residual(self.shard_residuals, key, mean)
        q, scales = quantize_int8(mean, self.chunk)
        if ef:
            finite = bool(torch.isfinite(mean).all())
            self.shard_residuals[key] = mean - dequantize_int8(q, scales, self.chunk) if finite else mean.zero_()
        mine = self.pack(q, scales)
        gathered = [torch.empty_like(mine) for _ in range(world)]

        def decompress(fut: torch.futures.Future) -> torch.Tensor:
            buffer.copy_(self.unpack(torch.stack(gathered), shard).flatten()[:numel])
            return buffer

        return dist.all_gather(gathered, mine, group=self.group, async_op=True).get_future().then(decompress)


class _TopK(_Hook):
    """Top-k by magnitude per bucket: all-gather of every rank's (fp32 values, int32 indices), scatter-add, average."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats, fraction: float, error_feedback: bool) -> None:
        super().__init__(group, stats)
        self.fraction, self.error_feedback = fraction, error_feedback
        self.residuals: dict[int, torch.Tensor] = {}

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer, key, world = bucket.buffer(), bucket.index(), self.world
        grad = buffer.to(torch.float32, copy=True)
        if self.error_feedback:
            grad += _residual(self.residuals, key, grad)
            finite = self.finite(grad)
        values, indices = topk_compress(grad, self.fraction)
        if self.error_feedback:
            grad[indices.long()] = 0
            self.residuals[key] = grad if finite else torch.zeros_like(grad)
        k = values.numel()
        mine = torch.cat([values.view(torch.int32), indices])
        gathered = [torch.empty_like(mine) for _ in range(world)]
        self.count(bucket, (world - 1) * mine.numel() * mine.element_size())

        def decompress(fut: torch.futures.Future) -> torch.Tensor:
            rows = torch.stack(gathered)
            dense = topk_decompress(rows[:, :k].contiguous().view(torch.float32), rows[:, k:], buffer.numel())
            buffer.copy_(dense.div_(world))
            return buffer

        return dist.all_gather(gathered, mine, group=self.group, async_op=True).get_future().then(decompress)


class _PowerSGD(_Hook):
    """torch's powerSGD_hook: plain all-reduce for ``start_iter`` steps, then all-reduces of the low-rank P and Q
    factors plus the tensors too small to compress; the elements it all-reduces come from its own counters.

    It starts the P and Q all-reduces from future callbacks, which on gloo race with the next bucket's hook and hang
    once buckets pair up wrongly across ranks; so each bucket's exchange is waited for before the hook returns.
    """

    def __init__(self, group: dist.ProcessGroup, stats: CommStats, rank: int, start_iter: int,
                 error_feedback: bool) -> None:
        super().__init__(group, stats)
        self.state = powerSGD_hook.PowerSGDState(process_group=group, matrix_approximation_rank=rank,
                                                 start_powerSGD_iter=start_iter, use_error_feedback=error_feedback)

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state, buffer = self.state, bucket.buffer()
        before, compressing = state.total_numel_after_compression, state.iter >= state.start_powerSGD_iter
        fut = powerSGD_hook.powerSGD_hook(state, bucket)
        numel = state.total_numel_after_compression - before if compressing else buffer.numel()
        self.count(bucket, _allreduce_bytes(numel * buffer.element_size(), self.world))
        fut.wait()
        return fut


def _hook(state, bucket):  # unannotated: DDP compares annotations with the real classes, and here they are strings
    return state(bucket)


def compress_gradients(ddp_model: DistributedDataParallel, spec: str, *, error_feedback: bool | None = None,
                       process_group: dist.ProcessGroup | None = None) -> CommStats:
    """Register a DDP communication hook that compresses gradient buckets per ``spec``; returns its live ``CommStats``.

    Specs: ``"fp16"``, ``"bf16"`` (torch's cast hooks), ``"int8"`` / ``"int8:chunk=512"`` (per-chunk symmetric int8),
    ``"topk:0.01"`` (largest 1% per bucket), ``"powersgd"`` / ``"powersgd:rank=4,start_iter=10"`` (torch's PowerSGD).
    ``error_feedback`` keeps each bucket's compression residual and adds it back the next step: default on for top-k
    and PowerSGD, off for int8, unsupported for fp16/bf16. ``process_group`` defaults to the model's own group.
    At world size 1 the hook passes buckets through unchanged and counts 0 bytes. Register once per model.
    A bucket holding inf / NaN arrives with NaN at those entries (int8, top-k; for GradScaler to skip the step), and
    its error-feedback residual is reset rather than kept (``CommStats.nonfinite_buckets``, one warning).
    """
    name, options = parse_spec(spec)
    if error_feedback and name in ("fp16", "bf16"):
        raise ValueError(f"error_feedback is not supported for {name!r}; use 'int8', 'topk:F' or 'powersgd'")
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"ddp_model: compress_gradients expects a torch.nn.parallel.DistributedDataParallel model, "
                        f"got {type(ddp_model).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("compress_gradients needs an initialized process group: call "
                           "torch.distributed.init_process_group before wrapping the model in DDP")
    group = process_group if process_group is not None else ddp_model.process_group
    stats = CommStats(spec, dist.get_world_size(group))
    if stats.world_size == 1:
        hook = _Hook(group, stats)
    elif name in ("fp16", "bf16"):
        hook = _Cast(group, stats, torch.float16 if name == "fp16" else torch.bfloat16)
    elif name == "int8":
        hook = _Int8(group, stats, options["chunk"], bool(error_feedback))
    elif name == "topk":
        hook = _TopK(group, stats, options["fraction"], error_feedback is not False)
    else:
        hook = _PowerSGD(group, stats, options["rank"], options["start_iter"], error_feedback is not False)
    ddp_model.register_comm_hook(hook, _hook)
    return stats
