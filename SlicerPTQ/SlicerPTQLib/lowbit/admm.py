"""Per-layer weight solvers: round-to-nearest and EfficientQ's ADMM.

Both return grid integers ``q`` (C, P) and per-channel scales for the
effective weights ``W`` (C, P) of one group, judged by the weighted output
error ``sum_v d_v ||W x_v - y_v||^2`` of :class:`NormalEquations`.

ADMM (scaled form) minimises ``||(W X - Y) D^1/2||^2 + eta/2 ||W - W0||^2``
with ``W`` on the grid, splitting ``W = G``:

- W-step (closed form): ``W (A0 + (rho + eta) I) = B0 + eta W0 + rho (G - U)``
  with ``A0 = 2 X D X^T``, ``B0 = 2 Y D X^T``. The matrix changes with rho
  only, so it is factored (Cholesky) once per rho value; when the layer has
  fewer voxels n than patch entries P the Woodbury identity solves an n x n
  system instead of a P x P one.
- projection: refit the per-channel scales and round ``W + U`` -> ``G``;
- dual: ``U <- U + W - G``;
- rho doubles (U halves) at the milestones; the iterate with the lowest
  weighted output error is kept, starting from round-to-nearest, so the
  solver never returns a worse layer than RTN on the calibration sample.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Sequence

import torch

from .features import NormalEquations
from .grid import fit_scale, project

#: Iterations at which rho doubles (EfficientQ's schedule for 200 iterations).
RHO_MILESTONES = (0, 50, 100, 150)


@dataclass
class Solution:
    """Grid integers ``q`` (C, P), scales (C,) and the weighted output error (sum over channels)."""

    q: torch.Tensor
    scale: torch.Tensor
    error: float


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: the solver's steps are small element-wise ops, for
    which OpenMP's thread hand-offs cost more than they give (measured 10-20x
    slower with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def solve_rtn(equations: NormalEquations, weights: torch.Tensor, bits: int) -> Solution:
    """Round-to-nearest with MSE-fitted per-channel scales, and its output error."""
    with single_thread():
        scale, q = fit_scale(weights, bits)
    error = float(equations.weighted_error(scale[:, None] * q).sum())
    return Solution(q=q, scale=scale, error=error)


class _Objective:
    """Weighted output error of candidate weights G, expanded around W0:

    err(G) = err(W0) + D A D^T + 2 D (A W0^T - B)^T with D = G - W0 per
    channel, so float32 rounding scales with the (small) change D rather
    than with the output energy.
    """

    def __init__(self, equations: NormalEquations, w0: torch.Tensor):
        self.w0 = w0
        self.gram = equations.gram.float() if equations.gram is not None else None
        self.factor = equations.factor
        w0d = w0.double()
        if equations.gram is not None:
            applied = w0d @ equations.gram
        else:
            factor = equations.factor.double()
            applied = (w0d @ factor) @ factor.T
        self.slope = (applied - equations.cross).float()
        self.base = equations.weighted_error(w0).float()

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        delta = g - self.w0
        if self.gram is not None:
            quadratic = ((delta @ self.gram) * delta).sum(dim=1)
        else:
            quadratic = (delta @ self.factor).square().sum(dim=1)
        return (self.base + quadratic + 2.0 * (delta * self.slope).sum(dim=1)).clamp_min(0.0)


class _Inverse:
    """``R -> R (A0 + c I)^-1`` for the values of c met, factored once each."""

    def __init__(self, equations: NormalEquations):
        self.equations = equations
        self._cache: Dict[float, torch.Tensor] = {}

    def apply(self, rhs: torch.Tensor, shift: float) -> torch.Tensor:
        eq = self.equations
        if shift not in self._cache:
            self._cache.clear()
            if eq.gram is not None:
                matrix = 2.0 * eq.gram
                matrix.diagonal().add_(shift)
            else:
                # (cI + 2 F F^T)^-1 = (I - F (c/2 I + F^T F)^-1 F^T) / c
                f = eq.factor.double()
                matrix = f.T @ f
                matrix.diagonal().add_(shift / 2.0)
            self._cache[shift] = torch.cholesky_inverse(torch.linalg.cholesky(matrix)).float()
        inverse = self._cache[shift]
        if eq.gram is not None:
            return rhs @ inverse
        f = eq.factor
        return (rhs - ((rhs @ f) @ inverse) @ f.T) / shift


def solve_admm(equations: NormalEquations, weights: torch.Tensor, bits: int, start: Solution,
               iterations: int = 200, regularizer: bool = True,
               milestones: Sequence[int] = RHO_MILESTONES, rho_factor: float = 10.0) -> Solution:
    """EfficientQ's layer-wise ADMM for the effective weights ``weights`` (C, P).

    ``start`` is the round-to-nearest solution (the first "best" iterate).
    Hyper-parameters follow the paper: ``s = max(numel(Y) std(Y) /
    (numel(W) std(W)), 1) * mean(d)``, ``rho0 = rho_factor * s``,
    ``eta = s`` (0 without the regularizer).
    """
    w0 = weights.float()
    numel_y = equations.voxels * w0.shape[0]
    w_std = float(w0.std()) if w0.numel() > 1 else 0.0
    ratio = numel_y * equations.target_std / max(w0.numel() * w_std, 1e-30)
    s = max(ratio, 1.0) * equations.weight_sum / max(equations.voxels, 1)
    eta = s if regularizer else 0.0
    rho = rho_factor * s
    with single_thread():
        objective = _Objective(equations, w0)
        best_q, best_scale = start.q.clone(), start.scale.clone()
        best_error = objective(best_scale[:, None] * best_q)
        constant = (2.0 * equations.cross).float() + eta * w0
        inverse = _Inverse(equations)
        g = w0.clone()
        u = torch.zeros_like(w0)
        scale = start.scale.float()
        milestones = set(milestones)
        for iteration in range(iterations):
            if iteration in milestones:
                rho *= 2.0
                u /= 2.0
            w = inverse.apply(constant + rho * (g - u), rho + eta)
            u += w
            scale, q = project(u, scale, bits)
            g = scale[:, None] * q
            u -= g
            # Keep the best iterate per output channel: channels do not interact in the error.
            error = objective(g)
            better = error < best_error
            if bool(better.any()):
                best_error = torch.where(better, error, best_error)
                best_scale = torch.where(better, scale, best_scale)
                best_q = torch.where(better[:, None], q, best_q)
    return Solution(q=best_q, scale=best_scale, error=float(best_error.sum()))
