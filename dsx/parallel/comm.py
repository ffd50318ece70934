"""Compressed gradient communication for DistributedDataParallel: fp16/bf16, int8, top-k, 2:4 and PowerSGD hooks.
Gradient traffic often limits data-parallel scaling; each hook counts the bytes it sends against fp32 all-reduce.

Bytes are counted per rank with the bandwidth-optimal ring model: an all-reduce of ``B`` bytes sends ``2 (N-1) B / N``,
an all-gather of ``B`` bytes per rank ``(N-1) B`` and an all-to-all of ``B`` bytes ``(N-1) B / N``, so ``ratio``
compares like with like for any world size ``N``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from dsx.parallel.codecs import Codec, IntCodec, TopKCodec, TwoFourCodec


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


class _ReduceScatter(_Hook):
    """All-reduce as all-to-all + all-gather of encoded shards, so traffic stays that of a ring all-reduce of the
    payload at any world size (int8, 2:4).

    The bucket is split into one shard per rank and encoded; an all-to-all sends shard ``j`` to rank ``j``, which
    decodes the N copies, averages and re-encodes them (a reduce-scatter); an all-gather of the averaged shards then
    gives every rank the same gradient.
    With error feedback each rank keeps its encoding residual for the bucket, and each shard's owner the residual
    of re-encoding the average, both added back the next step.
    """

    def __init__(self, group: dist.ProcessGroup, stats: CommStats, codec: Codec, error_feedback: bool) -> None:
        super().__init__(group, stats)
        self.codec, self.error_feedback = codec, error_feedback
        self.residuals: dict[int, torch.Tensor] = {}
        self.shard_residuals: dict[int, torch.Tensor] = {}

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer, key, world, ef = bucket.buffer(), bucket.index(), self.world, self.error_feedback
        numel = buffer.numel()
        shard = -(-numel // world)
        grad = buffer.to(torch.float32, copy=True)
        if ef:
            grad += _residual(self.residuals, key, grad)
        shards = F.pad(grad, (0, shard * world - numel)).view(world, shard)
        send = self.codec.encode(shards)
        if ef:
            error = (shards - self.codec.decode(send, shard)).flatten()[:numel]
            self.residuals[key] = error if self.finite(grad) else torch.zeros_like(grad)
        received = torch.empty_like(send)
        self.count(bucket, 2 * (world - 1) * send.shape[1])
        # Waited for here, not chained: a collective started from a future's callback could be issued in a different
        # order on each rank (callbacks of several buckets race on gloo's threads) and pair with the wrong peer.
        dist.all_to_all_single(received, send, group=self.group)
        mean = self.codec.decode(received, shard).sum(0).div_(world)
        if ef:
            mean += _residual(self.shard_residuals, key, mean)
        mine = self.codec.encode(mean)
        if ef:
            finite = bool(torch.isfinite(mean).all())
            self.shard_residuals[key] = mean - self.codec.decode(mine, shard) if finite else mean.zero_()
        gathered = [torch.empty_like(mine) for _ in range(world)]

        def decompress(fut: torch.futures.Future) -> torch.Tensor:
            buffer.copy_(self.codec.decode(torch.stack(gathered), shard).flatten()[:numel])
            return buffer

        return dist.all_gather(gathered, mine, group=self.group, async_op=True).get_future().then(decompress)


class _Gather(_Hook):
    """All-gather of every rank's encoded bucket (top-k), each decoded, summed in rank order and averaged."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats, codec: Codec, error_feedback: bool) -> None:
        super().__init__(group, stats)
        self.codec, self.error_feedback = codec, error_feedback
        self.residuals: dict[int, torch.Tensor] = {}

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer, key, world = bucket.buffer(), bucket.index(), self.world
        grad = buffer.to(torch.float32, copy=True)
        if self.error_feedback:
            grad += _residual(self.residuals, key, grad)
        mine = self.codec.encode(grad)
        if self.error_feedback:
            finite = self.finite(grad)
            self.residuals[key] = grad - self.codec.decode(mine, grad.numel()) if finite else torch.zeros_like(grad)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        self.count(bucket, (world - 1) * mine.numel())

        def decompress(fut: torch.futures.Future) -> torch.Tensor:
            buffer.copy_(self.codec.decode(torch.stack(gathered), buffer.numel()).sum(0).div_(world))
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


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class _Spec:
    """A spec name: its options and their defaults, the hook it builds at world size >= 2, its error-feedback default
    (None: not supported) and the option a bare value sets (``"topk:0.01"``, ``"2:4:bf16"``)."""

    options: dict[str, Any]
    build: Callable[[dist.ProcessGroup, CommStats, dict[str, Any], bool], _Hook]
    error_feedback: bool | None = None
    positional: str = ""


_REGISTRY: dict[str, _Spec] = {
    "fp16": _Spec({}, lambda g, s, o, ef: _Cast(g, s, torch.float16)),
    "bf16": _Spec({}, lambda g, s, o, ef: _Cast(g, s, torch.bfloat16)),
    "int8": _Spec({"chunk": 1024}, lambda g, s, o, ef: _ReduceScatter(g, s, IntCodec(o["chunk"]), ef), False),
    "topk": _Spec({"fraction": 0.01, "bits": 32},
                  lambda g, s, o, ef: _Gather(g, s, TopKCodec(o["fraction"], o["bits"]), ef), True, "fraction"),
    "2:4": _Spec({"dtype": "fp16"},
                 lambda g, s, o, ef: _ReduceScatter(g, s, TwoFourCodec(_DTYPES[o["dtype"]]), ef), True, "dtype"),
    "powersgd": _Spec({"rank": 4, "start_iter": 10},
                      lambda g, s, o, ef: _PowerSGD(g, s, o["rank"], o["start_iter"], ef), True),
}
_MINIMUMS = {"chunk": 1, "rank": 1, "start_iter": 2}
_CHOICES = {"bits": (4, 8, 32), "dtype": tuple(_DTYPES)}

SPECS = tuple(name + (f"[:{','.join(f'{k}={v}' for k, v in entry.options.items())}]" if entry.options else "")
              for name, entry in _REGISTRY.items())
"""The spec strings ``compress_gradients`` accepts, defaults shown; options go after a colon, comma-separated."""


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a gradient compression spec into its name and options, defaults filled in.

    Args:
        spec: a name of ``SPECS``, optionally followed by ``:`` and comma-separated ``key=value`` options; a bare
            value sets topk's ``fraction`` or 2:4's ``dtype``: ``"int8:chunk=512"``, ``"topk:0.01,bits=4"``.

    Returns:
        ``(name, options)``, e.g. ``("int8", {"chunk": 512})``.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: an unknown name or option, or an option value of the wrong type or out of range (named).
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string such as 'int8' or 'topk:0.01', got {type(spec).__name__}")
    text = spec.strip().lower()
    name = next((n for n in _REGISTRY if text == n or text.startswith(n + ":")), None)
    if name is None:
        raise ValueError(f"unknown gradient compression spec {spec!r}; valid specs: {', '.join(SPECS)}")
    entry = _REGISTRY[name]
    options = dict(entry.options)
    for item in filter(None, (s.strip() for s in text[len(name) + 1:].split(","))):
        key, eq, value = item.partition("=")
        key, value = (key.strip(), value.strip()) if eq else (entry.positional, key.strip())
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
    for key, low in _MINIMUMS.items():
        if key in options and options[key] < low:
            raise ValueError(f"{name} {key} must be >= {low}, got {options[key]} in spec {spec!r}")
    for key, allowed in _CHOICES.items():
        if key in options and options[key] not in allowed:
            raise ValueError(f"{name} {key} must be one of {', '.join(map(str, allowed))}, got {options[key]!r} "
                             f"in spec {spec!r}")
    return name, options


def compress_gradients(ddp_model: DistributedDataParallel, spec: str, *, error_feedback: bool | None = None,
                       process_group: dist.ProcessGroup | None = None) -> CommStats:
    """Register a DDP communication hook that compresses gradient buckets per ``spec``.

    Specs: ``"fp16"``, ``"bf16"`` (torch's cast hooks); ``"int8"`` / ``"int8:chunk=512"`` (per-chunk symmetric int8,
    reduce-scatter + all-gather); ``"topk:0.01"`` (largest 1% per bucket, fp32 values, all-gather) and
    ``"topk:0.01,bits=4"`` (the values as 4-bit integers, one fp32 scale per 64; ``bits=8`` likewise), both with
    compact positions (uint16 offsets, or a bitmap when denser); ``"2:4"`` / ``"2:4:bf16"`` (the 2 largest of every
    4 values in fp16 / bf16 plus 2-bit positions, reduce-scatter + all-gather); ``"powersgd"`` /
    ``"powersgd:rank=4,start_iter=10"`` (torch's PowerSGD).
    At world size 1 the hook passes buckets through unchanged and counts 0 bytes. Register once per model.
    A bucket holding inf / NaN arrives with NaN at those entries (int8, top-k, 2:4; for GradScaler to skip the step),
    and its error-feedback residual is reset rather than kept (``CommStats.nonfinite_buckets``, one warning).

    Args:
        ddp_model: the ``DistributedDataParallel`` model whose gradients to compress.
        spec: what to send; see ``SPECS`` and ``parse_spec``.
        error_feedback: keep each bucket's compression residual and add it back the next step; default on for top-k,
            2:4 and PowerSGD, off for int8, unsupported for fp16 / bf16.
        process_group: defaults to the model's own group.

    Returns:
        The hook's live ``CommStats`` (bytes sent vs an fp32 all-reduce).

    Raises:
        TypeError: ``ddp_model`` is not DDP, or ``spec`` is not a string.
        ValueError: a malformed spec (see ``parse_spec``), or ``error_feedback=True`` for fp16 / bf16.
        RuntimeError: no initialized process group.

    Example:
        >>> stats = dsx.parallel.compress_gradients(DistributedDataParallel(model), "powersgd:rank=4")
    """
    name, options = parse_spec(spec)
    entry = _REGISTRY[name]
    if error_feedback and entry.error_feedback is None:
        supported = ", ".join(repr(n) for n, e in _REGISTRY.items() if e.error_feedback is not None)
        raise ValueError(f"error_feedback is not supported for {name!r}; use one of {supported}")
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"ddp_model: compress_gradients expects a torch.nn.parallel.DistributedDataParallel model, "
                        f"got {type(ddp_model).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("compress_gradients needs an initialized process group: call "
                           "torch.distributed.init_process_group before wrapping the model in DDP")
    group = process_group if process_group is not None else ddp_model.process_group
    stats = CommStats(spec, dist.get_world_size(group))
    ef = entry.error_feedback if error_feedback is None else bool(error_feedback)
    hook = _Hook(group, stats) if stats.world_size == 1 else entry.build(group, stats, options, bool(ef))
    ddp_model.register_comm_hook(hook, _hook)
    return stats
