"""Alternating least squares (ALS) for a rank-r factorisation ``W ~ B A``: ``svd_compress``'s second solver.

Each half-step is a least-squares solve with the other factor fixed, for the objective ``||(W - B A) L||_F^2`` with
``L L^T = G`` (``G = X^T X`` of the calibration inputs; ``G = I`` is the plain ``||W - B A||_F``):

- ``B = W G A^T (A G A^T)^{-1}`` (``A`` fixed);
- ``A = (B^T B)^{-1} B^T W`` (``B`` fixed; ``G`` cancels: any A with ``B A L = P_B W L`` is optimal, and this is one).

One sweep costs O(out * in * r) (plus O(in^2 r) with ``G``) against a full SVD's O(out * in * min(out, in)); it is
subspace iteration in disguise, so it converges to the truncated (or whitened) SVD's error at the rate
``(s_{r+1} / s_r)^2`` per sweep. The error after each sweep is computed from the r x r products the solves use:
with ``B`` optimal for ``A``, ``||W - B A||_G^2 = ||W||_G^2 - <B, W G A^T>``.

A warm start (``init``: the A of an earlier fit, e.g. of the layer ``svd_compress`` or C-LoRA's ``compress`` made
from the same W under other calibration data) starts from that subspace instead of a random one: seed 003's
incremental update, "without recalculating everything from scratch". Everything runs on the weight's device, in
float64 by default (``ALSConfig.precision``); the factors come back in the weight's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import check_choice, check_int, check_number


@dataclass(frozen=True)
class ALSConfig:
    """When ALS stops: the error's relative change between sweeps below ``tol``, or ``max_sweeps`` sweeps."""

    tol: float = 1e-7
    max_sweeps: int = 300
    seed: int = 0
    """Seeds the random start (a warm start has none)."""
    precision: str = "float64"
    """The dtype of the products and solves: 'float64', or 'float32' (faster on GPUs; errors good to ~1e-6)."""

    def __post_init__(self) -> None:
        check_number("tol", self.tol, 0.0, 1.0)
        check_int("max_sweeps", self.max_sweeps, 1)
        check_int("seed", self.seed, 0)
        check_choice("precision", self.precision, {"float64", "float32"})


@dataclass
class ALSFit:
    a: torch.Tensor
    """(r, in), in the weight's dtype."""
    b: torch.Tensor
    """(out, r)."""
    errors: list[float] = field(default_factory=list)
    """The relative error ``||W - B A||_G / ||W||_G`` after each sweep (the returned factors have the last)."""
    converged: bool = False
    """The relative change fell below ``tol`` (else ``max_sweeps`` ran out)."""


class ALSError(ValueError):
    """ALS cannot fit: a rank above the numerical rank, a singular Gram matrix, or values that are not finite."""


def als_factors(weight: torch.Tensor, rank: int, gram: Optional[torch.Tensor] = None,
                init: Optional[torch.Tensor] = None, cfg: ALSConfig = ALSConfig()) -> ALSFit:
    """Factors ``(A (r, in), B (out, r))`` minimising ``||(W - B A) L||_F`` (``L L^T = gram``; plain without it).

    ``init``: an (r, in) A to start from (a warm start); else a seeded Gaussian one.
    Raises :class:`ALSError` (a ``ValueError``) when W, ``gram`` or ``init`` hold NaN or inf, or a solve meets a
    singular r x r matrix (``rank`` above the rank of W, or of the calibration inputs).
    """
    check_int("rank", rank, 1)
    out_features, in_features = weight.shape
    if rank > min(weight.shape):
        raise ALSError(f"rank {rank} > min(out, in) = {min(weight.shape)}: ALS needs rank <= min(out, in)")
    dtype = getattr(torch, cfg.precision)
    w = weight.detach().to(dtype)
    g = None if gram is None else gram.detach().to(device=w.device, dtype=dtype)
    for what, tensor in (("the weight", w), ("the calibration Gram matrix", g), ("the warm start", init)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ALSError(f"{what} holds NaN or inf; ALS needs finite values")
    if init is not None:
        if tuple(init.shape) != (rank, in_features):
            raise ALSError(f"the warm start A has shape {tuple(init.shape)}; expected (rank, in) = ({rank}, {in_features})")
        a = init.detach().to(device=w.device, dtype=dtype)
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        a = torch.randn(rank, in_features, generator=generator, dtype=dtype).to(w.device)
    total = float((w * (w @ g)).sum()) if g is not None else float(w.pow(2).sum())
    if total <= 0:
        raise ALSError("the weight is zero (under the calibration inputs); there is nothing to factorise")
    fit = ALSFit(a, a.new_zeros(out_features, rank))
    for sweep in range(1, cfg.max_sweeps + 1):
        ga = g @ a.t() if g is not None else a.t()  # (in, r)
        wa = w @ ga  # (out, r)
        fit.a, fit.b = a, _solve(a @ ga, wa.t(), "A G A^T", sweep).t()  # B = W G A^T (A G A^T)^{-1}
        fit.errors.append(max(total - float((fit.b * wa).sum()), 0.0) ** 0.5 / total ** 0.5)
        if len(fit.errors) > 1 and abs(fit.errors[-2] - fit.errors[-1]) <= cfg.tol * max(fit.errors[-1], 1e-30):
            fit.converged = True
            break
        if sweep < cfg.max_sweeps:
            a = _solve(fit.b.t() @ fit.b, fit.b.t() @ w, "B^T B", sweep)  # A = (B^T B)^{-1} B^T W
    fit.a, fit.b = fit.a.to(weight.dtype), fit.b.to(weight.dtype)
    return fit


def _solve(matrix: torch.Tensor, rhs: torch.Tensor, name: str, sweep: int) -> torch.Tensor:
    """``matrix^{-1} rhs`` for a symmetric positive definite r x r ``matrix``, in float64; singular is an error."""
    m = matrix.double()
    m = (m + m.t()) / 2
    eigenvalues = torch.linalg.eigvalsh(m)
    if not torch.isfinite(eigenvalues).all() or eigenvalues[0] <= 1e-12 * eigenvalues[-1].clamp_min(1e-300):
        raise ALSError(f"ALS sweep {sweep}: {name} is singular (condition > 1e12): the rank is above the numerical "
                       "rank of the weight or of the calibration inputs; choose a smaller rank, or solver='svd'")
    return torch.linalg.solve(m, rhs.double()).to(rhs.dtype)
