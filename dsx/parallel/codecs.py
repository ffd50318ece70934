"""Gradient codecs for dsx.parallel.comm: per-chunk symmetric integers, raw fp16/bf16/fp32, top-k and 2:4 sparsity.
Each codec turns fp32 rows into uint8 payloads whose size depends only on the row length, and back into fp32 rows."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

WINDOW = 1 << 16
"""Top-k positions are sent as uint16 offsets inside windows of this many entries, with an int32 count per window."""

TOPK_CHUNK = 64
"""Kept top-k values share one fp32 scale per this many when quantized to 4 or 8 bits."""


class Codec(Protocol):
    """Encodes fp32 tensors of shape ``(..., length)`` into uint8 payloads of shape ``(..., size(length))``."""

    def size(self, length: int) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, payload: torch.Tensor, length: int) -> torch.Tensor: ...


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def _view(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Payload bytes read as ``dtype`` (copied: a slice's offset may not be aligned to ``dtype``)."""
    return payload.clone(memory_format=torch.contiguous_format).view(dtype)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``codes`` below ``2**bits`` (bits 1, 2, 4 or 8) packed ``8 // bits`` per byte along the last dim."""
    per = 8 // bits
    codes = F.pad(codes, (0, -codes.shape[-1] % per)).view(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(-1, dtype=torch.uint8)  # the codes' bits do not overlap: the sum is their OR


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """The first ``length`` codes that ``pack_bits(codes, bits)`` packed into ``packed`` (uint8)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :length]


def nonfinite_code(bits: int) -> int:
    """The code of an inf / NaN entry at ``bits`` bits (finite values use ``±(2**(bits-1) - 1)``); it decodes to NaN."""
    return -(1 << (bits - 1))


def quantize(x: torch.Tensor, chunk: int, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``bits``-bit integers with one fp32 scale (absmax / qmax) per ``chunk`` entries of the last dim.

    The scales cover the finite entries only; an inf / NaN entry gets ``nonfinite_code(bits)`` (decoded as NaN), so
    it reaches the optimizer (and GradScaler) as non-finite without spoiling the rest of its chunk.
    Returns ``(q, scales)``: ``q`` int8 of ``x``'s shape, ``scales`` of shape ``(..., ceil(L / chunk))``.
    """
    length, qmax = x.shape[-1], (1 << (bits - 1)) - 1
    chunks = -(-length // chunk)
    blocks = F.pad(x.float(), (0, chunks * chunk - length)).view(*x.shape[:-1], chunks, chunk)
    finite = torch.isfinite(blocks)
    scales = blocks.abs().masked_fill_(~finite, 0).amax(-1) / qmax
    q = torch.round(blocks / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).clamp_(-qmax, qmax)
    q = q.masked_fill_(~finite, nonfinite_code(bits))
    return q.to(torch.int8).view(*x.shape[:-1], chunks * chunk)[..., :length], scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, chunk: int, bits: int = 8) -> torch.Tensor:
    """The fp32 tensor ``quantize(x, chunk, bits)`` encoded as ``(q, scales)`` (NaN where it was not finite)."""
    length = q.shape[-1]
    blocks = F.pad(q.float(), (0, scales.shape[-1] * chunk - length)).view(*scales.shape, chunk)
    out = (blocks * scales.unsqueeze(-1)).masked_fill_(blocks == nonfinite_code(bits), float("nan"))
    return out.view(*q.shape[:-1], -1)[..., :length]


class IntCodec:
    """``quantize``'s ``bits``-bit codes packed ``8 // bits`` per byte, then the fp32 scales."""

    def __init__(self, chunk: int, bits: int = 8) -> None:
        self.chunk, self.bits = chunk, bits

    def size(self, length: int) -> int:
        return -(-length * self.bits // 8) + 4 * -(-length // self.chunk)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        q, scales = quantize(x, self.chunk, self.bits)
        codes = (q.to(torch.int16) - nonfinite_code(self.bits)).to(torch.uint8)
        return torch.cat([pack_bits(codes, self.bits), _bytes(scales)], -1)

    def decode(self, payload: torch.Tensor, length: int) -> torch.Tensor:
        n = -(-length * self.bits // 8)
        q = unpack_bits(payload[..., :n], self.bits, length).to(torch.int16) + nonfinite_code(self.bits)
        return dequantize(q, _view(payload[..., n:], torch.float32), self.chunk, self.bits)


class RawCodec:
    """Values cast to ``dtype``; finite values beyond its range are clamped to it (error feedback keeps the rest)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def size(self, length: int) -> int:
        return length * self.dtype.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.finfo(self.dtype).max
        return _bytes(torch.where(torch.isfinite(x), x.clamp(-top, top), x).to(self.dtype))

    def decode(self, payload: torch.Tensor, length: int) -> torch.Tensor:
        return _view(payload, self.dtype).float()


def topk_count(numel: int, fraction: float) -> int:
    """How many entries top-k keeps of ``numel``: ``ceil(fraction * numel)``, at least 1."""
    return min(numel, max(1, math.ceil(round(fraction * numel, 6))))  # 0.1 * 170 is 17.000000000000004


def topk_compress(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk_count`` largest-magnitude entries of flat ``x`` (inf / NaN first): ``(values fp32, indices int64
    ascending)``."""
    indices = x.abs().topk(topk_count(x.numel(), fraction), sorted=False).indices.sort().values
    return x[indices].float(), indices


class TopKCodec:
    """Top-k of a 1-D tensor: its values through ``values`` (fp32, or 4 / 8-bit integers per ``TOPK_CHUNK``), then its
    ascending positions as uint16 offsets within ``WINDOW``-wide windows plus an int32 count per window, or as a
    bitmap where that is smaller (above about 1 kept entry in 16)."""

    def __init__(self, fraction: float, bits: int = 32) -> None:
        self.fraction = fraction
        self.values: Codec = RawCodec(torch.float32) if bits == 32 else IntCodec(TOPK_CHUNK, bits)

    def _bitmap(self, length: int) -> bool:
        return -(-length // 8) < 2 * topk_count(length, self.fraction) + 4 * -(-length // WINDOW)

    def size(self, length: int) -> int:
        k = topk_count(length, self.fraction)
        return self.values.size(k) + (-(-length // 8) if self._bitmap(length) else 2 * k + 4 * -(-length // WINDOW))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = topk_compress(x, self.fraction)
        if self._bitmap(x.numel()):
            mask = torch.zeros(x.numel(), dtype=torch.uint8, device=x.device).index_fill_(0, indices, 1)
            positions = pack_bits(mask, 1)
        else:
            offsets = torch.stack([indices & 0xFF, (indices >> 8) & 0xFF], -1).to(torch.uint8).flatten()
            counts = torch.bincount(indices // WINDOW, minlength=-(-x.numel() // WINDOW)).to(torch.int32)
            positions = torch.cat([offsets, _bytes(counts)])
        return torch.cat([self.values.encode(values), positions])

    def decode(self, payload: torch.Tensor, length: int) -> torch.Tensor:
        rows = payload.reshape(-1, payload.shape[-1])
        k = topk_count(length, self.fraction)
        n = self.values.size(k)
        values, positions = self.values.decode(rows[:, :n], k), rows[:, n:]
        if self._bitmap(length):
            indices = unpack_bits(positions, 1, length).nonzero()[:, 1].view(-1, k)  # row-major: k per row
        else:
            offsets = positions[:, :2 * k].reshape(-1, k, 2).long()
            counts = _view(positions[:, 2 * k:], torch.int32).long()
            windows = torch.arange(counts.shape[1], device=payload.device).repeat(len(rows))
            windows = windows.repeat_interleave(counts.flatten()).view(-1, k)
            indices = windows * WINDOW + offsets[..., 0] + (offsets[..., 1] << 8)
        out = torch.zeros(len(rows), length, device=payload.device).scatter_(1, indices, values)
        return out.view(*payload.shape[:-1], length)


class TwoFourCodec:
    """2:4 sparsity: the 2 largest magnitudes of every 4 consecutive entries (inf / NaN first) through ``values``
    (fp16 / bf16), then their positions in the group, 2 bits each, 4 to a byte. The last group is zero-padded."""

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.values = RawCodec(dtype)

    def size(self, length: int) -> int:
        kept = 2 * -(-length // 4)
        return self.values.size(kept) + -(-kept // 4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        groups = F.pad(x.float(), (0, -x.shape[-1] % 4)).view(*x.shape[:-1], -1, 4)
        positions = groups.abs().topk(2, -1, sorted=False).indices
        values = groups.gather(-1, positions).flatten(-2)
        return torch.cat([self.values.encode(values), pack_bits(positions.flatten(-2).to(torch.uint8), 2)], -1)

    def decode(self, payload: torch.Tensor, length: int) -> torch.Tensor:
        kept = 2 * -(-length // 4)
        n = self.values.size(kept)
        values = self.values.decode(payload[..., :n], kept).view(*payload.shape[:-1], -1, 2)
        positions = unpack_bits(payload[..., n:], 2, kept).view(values.shape).long()
        out = torch.zeros(*values.shape[:-1], 4, device=payload.device).scatter_(-1, positions, values)
        return out.flatten(-2)[..., :length]
