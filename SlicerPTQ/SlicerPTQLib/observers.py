"""Activation range observers for symmetric signed INT8.

An observer sees every calibration output of one tensor (``update``) and
then proposes the clipping bound ``amax`` (``amax()``); the quantization
scale is ``amax / 127`` with zero-point 0. Observers look only at ``|x|``
because the grid is symmetric.

- ``max``: the largest ``|x|`` seen (no clipping; one outlier widens the
  grid for everyone);
- ``percentile``: the given percentile of ``|x|`` (clips the rare tail);
- ``entropy``: TensorRT's calibration, the bound whose 128-level
  quantized histogram is closest (KL divergence) to the clipped original;
- ``mse``: the bound minimising the expected quantize-dequantize squared
  error over the histogram (trades clipping error against rounding error).

The histogram observers keep a fixed number of bins over ``[0, range]``;
when a later tensor exceeds the range, the range grows by an integer
factor so the old bins merge exactly into the new ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Type

import numpy as np

from .errors import PTQError

#: Largest magnitude of the symmetric signed INT8 grid ([-127, 127]).
INT8_MAX = 127


class Observer(ABC):
    """Collects statistics of one tensor and proposes its clipping bound."""

    @abstractmethod
    def update(self, x: np.ndarray) -> None:
        """Add one calibration output of the tensor (any shape)."""

    @abstractmethod
    def amax(self) -> float:
        """The clipping bound: the scale is ``amax / 127``."""


def _max_abs(x: np.ndarray) -> float:
    """``max |x|``, refusing NaN/Inf (they make every bound meaningless)."""
    if x.size == 0:
        return 0.0
    peak = float(max(np.max(x), -np.min(x)))
    if not np.isfinite(peak):
        raise PTQError("A calibration activation contains NaN or Inf; check the "
                       "calibration volumes' preprocessing (intensity scaling) "
                       "and that the FP32 model runs correctly on them.")
    return peak


class MaxObserver(Observer):
    """``amax = max |x|`` over all updates."""

    def __init__(self) -> None:
        self._amax = 0.0

    def update(self, x: np.ndarray) -> None:
        self._amax = max(self._amax, _max_abs(np.asarray(x)))

    def amax(self) -> float:
        return self._amax


class HistogramObserver(Observer):
    """Base for observers that choose the bound from a histogram of ``|x|``.

    ``num_bins`` equal bins cover ``[0, range]``; the range starts at the
    first non-zero ``max |x|`` and grows by an integer factor when needed.
    """

    def __init__(self, num_bins: int = 2048) -> None:
        if num_bins < 2 * INT8_MAX:
            raise PTQError(f"Histogram observers need at least {2 * INT8_MAX} bins, got {num_bins}.")
        self.num_bins = num_bins
        self.counts = np.zeros(num_bins, dtype=np.float64)
        self.range = 0.0
        self.peak = 0.0
        # Zeros seen before any non-zero value fixed the range.
        self._pending_zeros = 0

    @property
    def bin_width(self) -> float:
        return self.range / self.num_bins

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        peak = _max_abs(x)
        if peak == 0.0:
            if self.range == 0.0:
                self._pending_zeros += x.size
            else:
                self.counts[0] += x.size
            return
        self.peak = max(self.peak, peak)
        if self.range == 0.0:
            self.range = peak
            self.counts[0] += self._pending_zeros
            self._pending_zeros = 0
        elif peak > self.range:
            self._grow(peak)
        hist, _ = np.histogram(np.abs(x, dtype=np.float32), bins=self.num_bins,
                               range=(0.0, self.range))
        self.counts += hist

    def _grow(self, peak: float) -> None:
        """Widen the range by an integer factor, merging bins exactly."""
        factor = int(np.ceil(peak / self.range))
        # A float rounding can leave the peak a hair above factor * range.
        while factor * self.range < peak:
            factor += 1
        merged = np.zeros(self.num_bins, dtype=np.float64)
        np.add.at(merged, np.arange(self.num_bins) // factor, self.counts)
        self.counts = merged
        self.range *= factor

    def amax(self) -> float:
        if self.range == 0.0 or self.counts.sum() == 0:
            return 0.0
        # Bin edges can overshoot the data; no bound beyond max |x| helps.
        return float(min(self._choose_amax(), self.peak))

    @abstractmethod
    def _choose_amax(self) -> float:
        """The bound, from ``self.counts`` over ``[0, self.range]``."""


class PercentileObserver(HistogramObserver):
    """``amax`` = the ``percentile`` of ``|x|`` (interpolated within a bin)."""

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048) -> None:
        super().__init__(num_bins)
        if not 0.0 < percentile <= 100.0:
            raise PTQError(f"Percentile must be in (0, 100], got {percentile}.")
        self.percentile = percentile

    def _choose_amax(self) -> float:
        cumulative = np.cumsum(self.counts)
        target = cumulative[-1] * self.percentile / 100.0
        index = int(np.searchsorted(cumulative, target, side="left"))
        index = min(index, self.num_bins - 1)
        before = cumulative[index - 1] if index > 0 else 0.0
        inside = self.counts[index]
        fraction = (target - before) / inside if inside > 0 else 1.0
        return (index + fraction) * self.bin_width


class EntropyObserver(HistogramObserver):
    """TensorRT-style KL-divergence calibration over the ``|x|`` histogram.

    For each candidate bound (a bin edge ``i`` from ``num_levels`` up), the
    reference distribution P is the first ``i`` bins with the clipped tail
    added to the last one; the candidate Q merges those bins into
    ``num_levels`` quantization levels and spreads each level's mass
    evenly over its non-empty bins. The bound with the smallest KL(P || Q)
    wins. The first bin is flattened to its neighbour's height first:
    exact zeros (after ReLU, in padding) sit on the grid at no cost, yet
    their spike would dominate the divergence and pull the bound far down
    (to 10-30% of max |x| on deepbet's ReLUs).
    """

    def __init__(self, num_bins: int = 2048, num_levels: int = INT8_MAX + 1) -> None:
        super().__init__(num_bins)
        self.num_levels = num_levels

    def _choose_amax(self) -> float:
        counts = self.counts.copy()
        counts[0] = counts[1]
        candidates, divergence = self.divergences(counts, self.num_levels)
        return int(candidates[int(np.argmin(divergence))]) * self.bin_width

    @staticmethod
    def divergences(counts: np.ndarray, levels: int):
        """KL(P || Q) for every candidate edge ``i`` in ``[levels, len(counts)]``.

        All candidates at once from prefix sums: within a level Q is
        constant, so sum(P log Q) needs only per-level masses, and sum(P log P)
        is a prefix sum plus the last bin that carries the tail.
        Returns ``(candidates, divergences)``; impossible candidates are inf.
        """
        total = counts.sum()
        mass_before = np.concatenate([[0.0], np.cumsum(counts)])
        occupied_before = np.concatenate([[0], np.cumsum(counts > 0)])
        xlogx_before = np.concatenate([[0.0], np.cumsum(_xlogx(counts))])
        candidates = np.arange(levels, counts.size + 1)
        tail = total - mass_before[candidates]
        # Level j of candidate i covers bins [ceil(j i / L), ceil((j + 1) i / L)).
        starts = -((-np.arange(levels + 1)[None, :] * candidates[:, None]) // levels)
        level_mass = mass_before[starts[:, 1:]] - mass_before[starts[:, :-1]]
        level_bins = occupied_before[starts[:, 1:]] - occupied_before[starts[:, :-1]]
        per_bin = np.divide(level_mass, level_bins, out=np.ones_like(level_mass),
                            where=level_bins > 0)
        log_q = np.log(np.where(level_mass > 0, per_bin, 1.0))
        last = counts[candidates - 1]
        p_log_p = xlogx_before[candidates - 1] + _xlogx(last + tail)
        p_log_q = (level_mass * log_q).sum(axis=1) + tail * log_q[:, -1]
        q_total = mass_before[candidates]
        with np.errstate(divide="ignore"):
            divergence = (p_log_p - p_log_q) / total - np.log(total) + np.log(q_total)
        # The tail lands in an empty last bin, where Q is zero.
        divergence[((last == 0) & (tail > 0)) | (q_total == 0)] = np.inf
        return candidates, divergence


def _xlogx(values: np.ndarray) -> np.ndarray:
    """``v log v`` elementwise, with ``0 log 0 = 0``."""
    values = np.asarray(values, dtype=np.float64)
    positive = values > 0
    return np.where(positive, values * np.log(np.where(positive, values, 1.0)), 0.0)


class MSEObserver(HistogramObserver):
    """``amax`` minimising the expected quantize-dequantize squared error.

    Every bin contributes its count times the squared error of its centre
    after symmetric INT8 rounding with ``scale = amax / 127`` (values above
    ``amax`` saturate). Candidates are ``num_candidates`` evenly spaced
    bounds up to the observed range.
    """

    def __init__(self, num_bins: int = 2048, num_candidates: int = 512) -> None:
        super().__init__(num_bins)
        self.num_candidates = num_candidates

    def _choose_amax(self) -> float:
        centres = (np.arange(self.num_bins) + 0.5) * self.bin_width
        occupied = self.counts > 0
        centres, counts = centres[occupied], self.counts[occupied]
        candidates = self.range * np.arange(1, self.num_candidates + 1) / self.num_candidates
        errors = np.empty(candidates.size)
        # Chunked so the (candidates x bins) table stays a few MB.
        for start in range(0, candidates.size, 64):
            chunk = candidates[start:start + 64, None]
            scale = chunk / INT8_MAX
            restored = np.clip(np.round(centres / scale), 0, INT8_MAX) * scale
            errors[start:start + 64] = ((centres - restored) ** 2 * counts).sum(axis=1)
        return float(candidates[int(np.argmin(errors))])


_OBSERVERS: Dict[str, Type[Observer]] = {
    "max": MaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}

#: Calibration methods accepted by :func:`make_observer` (and the CLI).
METHODS = tuple(_OBSERVERS)


def make_observer(method: str) -> Observer:
    """A fresh observer for ``method`` ("max", "percentile", "entropy", "mse")."""
    try:
        return _OBSERVERS[method]()
    except KeyError:
        raise PTQError(f"Unknown calibration method {method!r}; choose one of "
                       f"{', '.join(METHODS)}.") from None


def histogram_amax(histogram: HistogramObserver, method: str) -> float:
    """The bound histogram ``method`` chooses from an already filled histogram.

    One histogram per tensor then serves percentile, entropy and mse alike.
    """
    observer = make_observer(method)
    if not isinstance(observer, HistogramObserver) or observer.num_bins != histogram.num_bins:
        raise PTQError(f"Method {method!r} does not choose its bound from a {histogram.num_bins}-bin histogram.")
    observer.counts, observer.range, observer.peak = histogram.counts, histogram.range, histogram.peak
    return observer.amax()


def fake_quantize(x: np.ndarray, amax: float) -> np.ndarray:
    """Symmetric INT8 quantize-dequantize of ``x`` with bound ``amax`` (for checks)."""
    scale = amax / INT8_MAX
    return np.clip(np.round(x / scale), -INT8_MAX, INT8_MAX) * scale
