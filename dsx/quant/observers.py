"""Activation-range observers for symmetric int8 static quantization: minmax, percentile, MSE, entropy (KL).

Their statistics merge exactly, so calibrating data shards apart (one per rank) equals calibrating the union.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

LEVELS = 127


def _abs64(x: Any, who: str) -> Tensor:
    """``|x|`` flattened in float64 (exact for every floating dtype), rejecting non-floats and NaN/inf."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}.update: x: expected a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}.update: x: expected a floating-point Tensor, got {x.dtype}")
    a = x.detach().reshape(-1).abs().to(torch.float64)
    if a.numel() and not bool(torch.isfinite(a).all()):
        raise ValueError(f"{who}.update: x contains NaN or inf")
    return a


def _check_state(state: Any, keys: set[str], who: str) -> dict[str, Tensor]:
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{who}.load_state: state: expected a dict with keys {sorted(keys)}, got {got}")
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise TypeError(f"{who}.load_state: state: every value must be a Tensor")
    return state


class Observer(abc.ABC):
    """Per-tensor range of one activation: ``update`` per batch, then ``amax()`` (clipping threshold) and
    ``scale()`` (``amax / 127``, the symmetric int8 step). ``merge`` adds another observer's statistics."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def update(self, x: Tensor) -> None:
        """Accumulate the statistics of one batch."""

    @abc.abstractmethod
    def amax(self) -> float:
        """The clipping threshold chosen from everything observed so far."""

    @abc.abstractmethod
    def state(self) -> dict[str, Tensor]:
        """The statistics as float64 tensors (copies)."""

    @abc.abstractmethod
    def load_state(self, state: dict[str, Tensor]) -> Observer:
        """Replace the statistics with ``state`` (as returned by ``state()``); returns ``self``."""

    @abc.abstractmethod
    def merge(self, other: Observer) -> Observer:
        """Add ``other``'s statistics to this observer's, in place; returns ``self``."""

    @property
    @abc.abstractmethod
    def count(self) -> int:
        """How many values were observed."""

    def scale(self) -> float:
        """``amax() / 127``; 1.0 for all-zero data (any scale quantizes zeros exactly)."""
        a = self.amax()
        return a / LEVELS if a > 0 else 1.0

    def _check_other(self, other: Any) -> None:
        if type(other) is not type(self):
            raise TypeError(f"{type(self).__name__}.merge: other: expected a {type(self).__name__}, "
                            f"got {type(other).__name__}")

    def _check_observed(self) -> None:
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__}: no data observed; call update() first")


class MinMaxObserver(Observer):
    """``amax`` is the largest ``|x|`` seen: nothing is clipped."""

    name = "minmax"

    def __init__(self) -> None:
        self._max = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)

    @property
    def count(self) -> int:
        return int(self._count.item())

    def update(self, x: Tensor) -> None:
        a = _abs64(x, type(self).__name__)
        if a.numel() == 0:
            return
        self._max = torch.maximum(self._max.to(a.device), a.max())
        self._count = self._count.to(a.device) + a.numel()

    def amax(self) -> float:
        self._check_observed()
        return float(self._max.item())

    def state(self) -> dict[str, Tensor]:
        return {"max": self._max.clone(), "count": self._count.clone()}

    def load_state(self, state: dict[str, Tensor]) -> MinMaxObserver:
        state = _check_state(state, {"max", "count"}, type(self).__name__)
        self._max = state["max"].detach().to(torch.float64).reshape(()).clone()
        self._count = state["count"].detach().to(torch.float64).reshape(()).clone().to(self._max.device)
        return self

    def merge(self, other: Observer) -> MinMaxObserver:
        self._check_other(other)
        self._max = torch.maximum(self._max, other._max.to(self._max.device))
        self._count = self._count + other._count.to(self._count.device)
        return self


def _exponent(maximum: float) -> int:
    """``e`` with ``2**(e-1) <= maximum < 2**e`` (0 for 0: an all-zero histogram has its mass in bin 0 at any range)."""
    return math.frexp(maximum)[1]


class HistogramObserver(Observer):
    """Base of the histogram observers: exact, order-independent counts of ``|x|``.

    ``bins`` counts of ``|x|`` over ``[0, 2**e)``, where ``e`` is the exponent of the running max
    (``2**(e-1) <= max < 2**e``). Value ``v`` falls in bin ``floor(v * 2**(log2(bins) - e))``, computed exactly
    (a power-of-two scaling). When the max grows to exponent ``e + k``, groups of ``2**k`` adjacent bins are
    summed, and because ``floor(floor(y) / 2**k) == floor(y / 2**k)`` this equals the histogram built directly
    at the new range. The state is thus a function of the multiset of values alone, not of batch order or
    sharding; counts are integers held in float64 (exact up to 2**53 values), so ``a.merge(b)`` reproduces bit
    for bit the state, hence the ``amax()``, of one observer fed the union.

    Distributed calibration: all-reduce ``state()["max"]`` with MAX, pass the result to ``grow_range``, then
    all-reduce ``state()["hist"]`` with SUM and ``load_state`` it.
    """

    def __init__(self, bins: int = 2048) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 256 or bins & (bins - 1):
            raise ValueError(f"bins: expected a power of two >= 256, got {bins!r}")
        self.bins = bins
        self._log2_bins = bins.bit_length() - 1
        self._pow2 = torch.tensor([2.0**k for k in range(self._log2_bins + 1)], dtype=torch.float64)
        self._hist = torch.zeros(bins, dtype=torch.float64)
        self._max = torch.zeros((), dtype=torch.float64)

    @property
    def count(self) -> int:
        return int(self._hist.sum().item())

    def range_max(self) -> float:
        """Upper end ``2**e`` of the histogram's range ``[0, 2**e)``."""
        return 2.0 ** _exponent(float(self._max.item()))

    def histogram(self) -> Tensor:
        """The counts (float64, ``bins`` long) over ``[0, range_max())``; a copy."""
        return self._hist.clone()

    def _rebinned(self, hist: Tensor, old_max: float, new_max: float) -> Tensor:
        """``hist`` (built for ``old_max``) re-binned exactly onto the range of ``new_max >= old_max``."""
        shift = _exponent(new_max) - _exponent(old_max)
        if old_max == 0 or shift == 0:
            return hist
        out = torch.zeros_like(hist)
        if shift >= self._log2_bins:
            out[0] = hist.sum()
        else:
            group = 1 << shift
            out[: self.bins // group] = hist.view(self.bins // group, group).sum(1)
        return out

    def grow_range(self, maximum: float | Tensor) -> None:
        """Raise the running max to ``maximum`` (if larger), re-binning the counts onto the wider range."""
        new_max = float(maximum.item() if isinstance(maximum, Tensor) else maximum)
        if not math.isfinite(new_max) or new_max < 0:
            raise ValueError(f"grow_range: maximum: expected a finite non-negative number, got {new_max}")
        old_max = float(self._max.item())
        if new_max <= old_max:
            return
        self._hist = self._rebinned(self._hist, old_max, new_max)
        self._max = torch.tensor(new_max, dtype=torch.float64, device=self._hist.device)

    def _bin_index(self, a: Tensor, exponent: int) -> Tensor:
        """``floor(a * 2**(log2(bins) - exponent))`` without overflow or rounding: ``a = m * 2**ea``, ``m < 1``."""
        m, ea = torch.frexp(a)
        shift = (ea.to(torch.int64) - (exponent - self._log2_bins)).clamp(0, self._log2_bins)
        return torch.floor(m * self._pow2.to(a.device)[shift]).to(torch.int64)

    def update(self, x: Tensor) -> None:
        a = _abs64(x, type(self).__name__)
        if a.numel() == 0:
            return
        self._hist, self._max = self._hist.to(a.device), self._max.to(a.device)
        self.grow_range(a.max())
        index = self._bin_index(a, _exponent(float(self._max.item())))
        self._hist = self._hist + torch.bincount(index, minlength=self.bins).to(torch.float64)

    def state(self) -> dict[str, Tensor]:
        return {"max": self._max.clone(), "hist": self._hist.clone()}

    def load_state(self, state: dict[str, Tensor]) -> HistogramObserver:
        state = _check_state(state, {"max", "hist"}, type(self).__name__)
        if state["hist"].shape != (self.bins,):
            raise ValueError(f"{type(self).__name__}.load_state: state['hist']: expected shape ({self.bins},), "
                             f"got {tuple(state['hist'].shape)}")
        self._hist = state["hist"].detach().to(torch.float64).clone()
        self._max = state["max"].detach().to(torch.float64).reshape(()).clone().to(self._hist.device)
        return self

    def merge(self, other: Observer) -> HistogramObserver:
        self._check_other(other)
        if other.bins != self.bins:
            raise ValueError(f"{type(self).__name__}.merge: other: expected {self.bins} bins, got {other.bins}")
        other_max = float(other._max.item())
        self.grow_range(other_max)
        hist = other._rebinned(other._hist, other_max, float(self._max.item()))
        self._hist = self._hist + hist.to(self._hist.device)
        return self

    def _stats(self) -> tuple[Tensor, float, float]:
        """Counts on the CPU (so ``amax`` is the same on every device), the max, and the bin width."""
        self._check_observed()
        maximum = float(self._max.item())
        return self._hist.cpu(), maximum, 2.0 ** _exponent(maximum) / self.bins


class PercentileObserver(HistogramObserver):
    """``amax`` is the ``percentile``-th percentile of ``|x|`` (linear within a histogram bin)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ValueError(f"percentile: expected a number in (0, 100], got {percentile!r}")
        super().__init__(bins)
        self.percentile = float(percentile)

    def amax(self) -> float:
        hist, maximum, width = self._stats()
        cumulative = torch.cumsum(hist, 0)
        target = self.percentile / 100 * float(cumulative[-1])
        i = min(int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64))[0]), self.bins - 1)
        below = float(cumulative[i - 1]) if i > 0 else 0.0
        fraction = (target - below) / float(hist[i]) if hist[i] > 0 else 1.0
        return min((i + fraction) * width, maximum)


class MSEObserver(HistogramObserver):
    """``amax`` minimises the mean squared error of fake-quantizing the observed data.

    Candidates: ``num_candidates`` thresholds spaced geometrically from ``min_fraction * max`` to ``max``. The
    error of each bin is integrated exactly, assuming its values are uniform within the bin (the bin holding the
    max ends at the max), so the estimate has no aliasing between bin width and quantization step.
    """

    name = "mse"

    def __init__(self, num_candidates: int = 200, min_fraction: float = 1e-3, bins: int = 2048) -> None:
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 2:
            raise ValueError(f"num_candidates: expected an int >= 2, got {num_candidates!r}")
        if not isinstance(min_fraction, (int, float)) or not 0 < min_fraction < 1:
            raise ValueError(f"min_fraction: expected a number in (0, 1), got {min_fraction!r}")
        super().__init__(bins)
        self.num_candidates = num_candidates
        self.min_fraction = float(min_fraction)

    def amax(self) -> float:
        hist, maximum, width = self._stats()
        if maximum == 0:
            return 0.0
        nonzero = hist.nonzero().squeeze(1)
        counts = hist[nonzero]
        lo = torch.clamp(nonzero.to(torch.float64) * width, max=maximum)
        hi = torch.clamp(lo + width, max=maximum)
        fractions = torch.logspace(math.log10(self.min_fraction), 0.0, self.num_candidates, dtype=torch.float64)
        thresholds = fractions * maximum
        thresholds[-1] = maximum
        step = (thresholds / LEVELS)[:, None]

        def level(v: Tensor) -> Tensor:
            return torch.clamp(torch.floor(v / step + 0.5), max=LEVELS)

        def integral(v: Tensor) -> Tensor:  # integral over [0, v] of (u - Q(u))^2 du
            k = level(v)
            return k * step**3 / 12 + (v - k * step) ** 3 / 3

        span = hi - lo
        mean_error = torch.where(
            span > 0,
            (integral(hi) - integral(lo)) / torch.clamp(span, min=torch.finfo(torch.float64).tiny),
            (lo - level(lo) * step) ** 2,
        )
        return float(thresholds[int(torch.argmin((mean_error * counts).sum(1)))])


class EntropyObserver(HistogramObserver):
    """``amax`` minimises KL(P || Q) in the style of TensorRT's entropy calibrator.

    For every candidate bin count ``i`` from 128 to the last non-empty bin: ``P`` is the first ``i`` bins with
    the counts beyond folded into bin ``i - 1``; ``Q`` merges the first ``i`` bins (without those outliers) into
    128 levels and spreads each level's mass evenly over its non-empty bins. The threshold is ``i`` bin widths
    (at most the max). Every candidate is evaluated at once from prefix sums. The histogram covers
    ``[0, 2**e)`` with ``max >= 2**(e-1)``, so the data spans between ``bins / 2`` and ``bins`` bins.
    """

    name = "entropy"
    QUANT_LEVELS = 128

    def amax(self) -> float:
        hist, maximum, width = self._stats()
        used = int(hist.nonzero().max()) + 1 if maximum > 0 else 0
        levels = self.QUANT_LEVELS
        if used <= levels:
            return maximum
        h = hist[:used]
        total = h.sum()
        zero = h.new_zeros(1)
        prefix = torch.cat([zero, torch.cumsum(h, 0)])
        prefix_nonzero = torch.cat([zero, torch.cumsum((h > 0).to(torch.float64), 0)])
        prefix_hlogh = torch.cat([zero, torch.cumsum(torch.xlogy(h, h), 0)])

        i = torch.arange(levels, used + 1)
        outliers = total - prefix[i]
        last = h[i - 1] + outliers
        p_log_p = prefix_hlogh[i - 1] + torch.xlogy(last, last) - total * torch.log(total)

        merged = (i // levels)[:, None]
        j = torch.arange(levels)
        starts = merged * j
        ends = torch.where(j == levels - 1, i[:, None], starts + merged)
        group_sum = prefix[ends] - prefix[starts]
        group_nonzero = prefix_nonzero[ends] - prefix_nonzero[starts]
        q = torch.where(group_sum > 0, group_sum / (group_nonzero.clamp(min=1) * prefix[i][:, None]), 1.0)
        p_log_q = (group_sum * torch.log(q)).sum(1) + torch.where(h[i - 1] > 0, outliers * torch.log(q[:, -1]), 0.0)

        kl = torch.where((h[i - 1] == 0) & (outliers > 0), torch.inf, p_log_p - p_log_q)
        return min(float(i[int(torch.argmin(kl))]) * width, maximum)


class ChannelAbsMax:
    """Running max of ``|x|`` per channel of the last dimension (the activation statistic SmoothQuant needs).

    Merging takes the element-wise max, which is exact.
    """

    def __init__(self) -> None:
        self._amax = torch.zeros(0, dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)

    @property
    def count(self) -> int:
        """How many rows (vectors along the last dimension) were observed."""
        return int(self._count.item())

    @property
    def channels(self) -> int:
        """Number of channels (0 before the first update)."""
        return self._amax.numel()

    def _combine(self, amax: Tensor, who: str) -> None:
        if self.count and amax.numel() != self.channels:
            raise ValueError(f"ChannelAbsMax.{who}: expected {self.channels} channels in the last dimension, "
                             f"got {amax.numel()}")
        self._amax = torch.maximum(self._amax.to(amax.device), amax) if self.count else amax

    def update(self, x: Tensor) -> None:
        if isinstance(x, Tensor) and x.dim() == 0:
            raise ValueError("ChannelAbsMax.update: x: expected at least one dimension (channels last), got a scalar")
        a = _abs64(x, "ChannelAbsMax")
        rows = a.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 0:
            return
        self._combine(a.view(rows, x.shape[-1]).amax(0), "update")
        self._count = self._count.to(a.device) + rows

    def amax(self) -> Tensor:
        """Per-channel max ``|x|`` (float32, one entry per channel)."""
        if self.count == 0:
            raise RuntimeError("ChannelAbsMax: no data observed; call update() first")
        return self._amax.to(torch.float32)

    def state(self) -> dict[str, Tensor]:
        return {"amax": self._amax.clone(), "count": self._count.clone()}

    def load_state(self, state: dict[str, Tensor]) -> ChannelAbsMax:
        state = _check_state(state, {"amax", "count"}, "ChannelAbsMax")
        self._amax = state["amax"].detach().to(torch.float64).reshape(-1).clone()
        self._count = state["count"].detach().to(torch.float64).reshape(()).clone().to(self._amax.device)
        return self

    def merge(self, other: ChannelAbsMax) -> ChannelAbsMax:
        """Add ``other``'s statistics (element-wise max), in place; returns ``self``."""
        if not isinstance(other, ChannelAbsMax):
            raise TypeError(f"ChannelAbsMax.merge: other: expected a ChannelAbsMax, got {type(other).__name__}")
        if other.count:
            self._combine(other._amax, "merge")
            self._count = self._count.to(self._amax.device) + other._count.to(self._amax.device)
        return self


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, **kwargs: Any) -> Observer:
    """A new observer by registry name (``minmax``, ``percentile``, ``mse``, ``entropy``) with its options."""
    if not isinstance(name, str) or name not in OBSERVERS:
        raise ValueError(f"observer: unknown name {name!r}; expected one of {', '.join(sorted(OBSERVERS))}")
    return OBSERVERS[name](**kwargs)
