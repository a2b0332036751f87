"""Activation range observers against distributions with known answers."""

import numpy as np
import pytest
from scipy.stats import norm

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.observers import (METHODS, EntropyObserver, MaxObserver, MSEObserver,
                                    PercentileObserver, fake_quantize, make_observer)

OUTLIERS = np.array([14.0, -15.0, 12.5, 13.0, -11.0], dtype=np.float32)


@pytest.fixture(scope="module")
def gaussian_with_outliers():
    data = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)
    data[:OUTLIERS.size] = OUTLIERS
    return data


def observed(method, data, parts=4):
    observer = make_observer(method)
    for part in np.array_split(data, parts):
        observer.update(part.reshape(1, 1, -1))
    return observer.amax()


def quantization_mse(data, amax):
    return float(np.mean((fake_quantize(data, amax) - data) ** 2))


def test_max_returns_the_outlier(gaussian_with_outliers):
    assert observed("max", gaussian_with_outliers) == 15.0


def test_percentile_matches_the_analytic_quantile(gaussian_with_outliers):
    # P(|x| > q) = 1e-4 for a standard normal.
    expected = norm.ppf(1 - 1e-4 / 2)
    assert observed("percentile", gaussian_with_outliers) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_histogram_methods_clip_the_outliers(gaussian_with_outliers, method):
    amax = observed(method, gaussian_with_outliers)
    assert 3.0 < amax < 8.0
    assert quantization_mse(gaussian_with_outliers, amax) < \
        0.5 * quantization_mse(gaussian_with_outliers, 15.0)


def test_mse_observer_beats_max_and_percentile_on_its_objective(gaussian_with_outliers):
    best = quantization_mse(gaussian_with_outliers, observed("mse", gaussian_with_outliers))
    for method in ("max", "percentile"):
        assert best <= quantization_mse(gaussian_with_outliers, observed(method, gaussian_with_outliers))


@pytest.mark.parametrize("method", METHODS)
def test_uniform_data_gives_the_bound(method):
    data = np.random.default_rng(1).uniform(-3.0, 3.0, 1_000_000)
    amax = observed(method, data)
    assert 2.9 <= amax <= 3.0


def test_growing_range_rebins_without_losing_counts():
    rng = np.random.default_rng(2)
    parts = [rng.standard_normal(100_000) * scale for scale in (0.1, 1.0, 7.0)]
    grown = PercentileObserver(99.0)
    for part in parts:
        grown.update(part)
    direct = PercentileObserver(99.0)
    direct.update(np.concatenate(parts))
    assert grown.counts.sum() == 300_000
    assert grown.range >= max(np.abs(part).max() for part in parts)
    assert grown.amax() == pytest.approx(direct.amax(), rel=0.01)
    assert grown.amax() == pytest.approx(np.percentile(np.abs(np.concatenate(parts)), 99.0), rel=0.01)


def test_leading_zero_tensors_are_counted():
    observer = PercentileObserver(50.0)
    observer.update(np.zeros(1000))
    observer.update(np.concatenate([np.zeros(500), np.full(500, 2.0)]))
    # 1500 of 2000 values are zero, so the median is zero.
    assert observer.amax() < 0.01
    assert MaxObserver().amax() == 0.0


def test_factory_and_errors():
    assert isinstance(make_observer("max"), MaxObserver)
    assert isinstance(make_observer("entropy"), EntropyObserver)
    assert isinstance(make_observer("mse"), MSEObserver)
    with pytest.raises(PTQError, match="max, percentile, entropy, mse"):
        make_observer("minmax")
    with pytest.raises(PTQError, match="NaN"):
        make_observer("mse").update(np.array([1.0, np.nan]))


def direct_kl(counts, edge, levels):
    """KL(P || Q) for one candidate edge, written out bin by bin."""
    p = counts[:edge].astype(float)
    p[-1] += counts[edge:].sum()
    q = np.zeros(edge)
    for level in range(levels):
        members = [b for b in range(edge) if b * levels // edge == level]
        filled = [b for b in members if counts[b] > 0]
        for b in filled:
            q[b] = counts[members].sum() / len(filled)
    p, q = p / p.sum(), q / q.sum()
    if np.any((p > 0) & (q == 0)):
        return np.inf
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def test_entropy_divergences_match_the_definition():
    rng = np.random.default_rng(3)
    counts = np.histogram(np.abs(rng.standard_normal(50_000)) ** 1.5, bins=600)[0].astype(float)
    candidates, divergences = EntropyObserver.divergences(counts, 128)
    for edge in (128, 129, 250, 411, 599, 600):
        expected = direct_kl(counts, edge, 128)
        got = divergences[candidates == edge][0]
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12) or (np.isinf(got) and np.isinf(expected))


def test_entropy_is_not_pulled_down_by_relu_zeros():
    rng = np.random.default_rng(4)
    relu = np.maximum(rng.standard_normal(1_000_000), 0.0)
    relu[:3] = 12.0
    amax = observed("entropy", relu)
    # Half the values are exact zeros; the bound must still cover the bulk.
    assert 2.5 < amax < 8.0
