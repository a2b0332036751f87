"""Symmetric integer weight grids with a zero and one scale per output channel.

A ``b``-bit weight is ``scale[c] * q`` with ``q`` an integer in
``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (4-bit: [-7, 7]; 3-bit: [-3, 3]; 2-bit:
[-1, 1]), so every low-bit weight is also a valid symmetric INT8 value and
runs unchanged on INT8 kernels (zero-point 0).

Scales are fitted by alternating ``q = round(v / a)`` and the least-squares
``a = <q, v> / <q, q>`` (the MSE-optimal scale for that rounding), started
from several clipping ratios; the best result per channel wins, so a fit
that does not settle still returns the best scale it met.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import PTQError

#: Weight bit widths the grids support (all fit in int8).
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)

# Starting clipping ratios (fraction of max|v|) for the scale fit: 2-bit
# grids want ~0.5-0.7, 8-bit ones ~1.
_CLIP_RATIOS = tuple(r / 12 for r in range(3, 13))


def level_limit(bits: int) -> int:
    """Largest integer of the ``bits`` grid: 2**(bits-1) - 1 (7 for 4-bit)."""
    if bits not in SUPPORTED_BITS:
        raise PTQError(f"Weight bits must be one of {SUPPORTED_BITS}, got {bits}. "
                       "Use 8 for INT8 weights or 2-4 for low-bit weights.")
    return 2 ** (bits - 1) - 1


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``q`` (same shape as ``values`` (C, n)) nearest to ``values / scale[:, None]``."""
    limit = level_limit(bits)
    return torch.div(values, scale[:, None]).round_().clamp_(-limit, limit)


def project(values: torch.Tensor, scale: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One refit-and-round step onto the grid for rows ``values`` (C, n) from ``scale`` (C,).

    Round with the current scale, refit the least-squares scale for those
    integers, round again: each half-step can only lower the squared
    error. Returns ``(scale, q)``.
    """
    q = round_to_grid(values, scale, bits)
    cross = (q * values).sum(dim=1)
    norm = (q * q).sum(dim=1)
    fitted = torch.where((norm > 0) & (cross > 0), cross / norm.clamp_min(1e-30), scale)
    return fitted, round_to_grid(values, fitted, bits)


def refine_scale(values: torch.Tensor, scale: torch.Tensor, bits: int,
                 rounds: int = 8) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternate rounding and least-squares scale from ``scale`` (C,) for rows of ``values`` (C, n).

    Returns ``(scale, q, squared error per row)`` for the best scale seen
    per row (not just the last), so a fit that cycles still improves. The
    error of a scale ``a`` with ``q = round(v / a)`` is
    ``|v|^2 - 2 a <q, v> + a^2 <q, q>``, read off the sums the fit needs.
    """
    energy = (values * values).sum(dim=1)
    best_scale = scale.clone()
    best_error = torch.full_like(energy, float("inf"))
    for _ in range(rounds + 1):
        q = round_to_grid(values, scale, bits)
        cross = (q * values).sum(dim=1)
        norm = (q * q).sum(dim=1)
        error = energy - 2.0 * scale * cross + scale * scale * norm
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        fitted = cross / norm.clamp_min(1e-30)
        # Rows that rounded to all zeros (or whose fit is not positive) keep their scale.
        fitted = torch.where((norm > 0) & (fitted > 0), fitted, scale)
        if torch.equal(fitted, scale):
            break
        scale = fitted
    return best_scale, round_to_grid(values, best_scale, bits), best_error.clamp_min(0.0)


def fit_scale(values: torch.Tensor, bits: int, warm_start: Optional[torch.Tensor] = None,
              rounds: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """MSE-fitted per-row scale and grid integers for ``values`` (C, n).

    Tries clipping ratios of ``max |v|`` (and ``warm_start`` (C,) when
    given), refines each by alternation and keeps, per row, the scale with
    the lowest squared error. Returns ``(scale (C,), q (C, n))``; all-zero
    rows get scale 1 and q 0.
    """
    limit = level_limit(bits)
    peak = values.abs().amax(dim=1)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    starts = [peak * ratio / limit for ratio in _CLIP_RATIOS]
    if warm_start is not None:
        starts.append(warm_start)
    best_scale = best_error = None
    for start in starts:
        scale, _, error = refine_scale(values, start, bits, rounds)
        if best_error is None:
            best_scale, best_error = scale, error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale, round_to_grid(values, best_scale, bits)
