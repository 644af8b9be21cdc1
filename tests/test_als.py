"""ALS (``svd_compress(solver="als")``, ``compress/als.py``) against the closed forms it must reach: the truncated
SVD's error (Eckart-Young) and the whitened SVD's error with calibration; warm starts; refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import assert_same_state, state_snapshot
from lorakit.compress import ALSConfig, ALSError, als_factors, truncated_svd, whitened_svd

pytestmark = pytest.mark.usefixtures("single_thread")


def spectrum_matrix(out: int, inp: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """A seeded (out, in) float64 matrix with singular values decay**i (a gap between every pair)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, inp, generator=gen, dtype=torch.float64))[0]
    k = min(out, inp)
    return (u[:, :k] * decay ** torch.arange(k, dtype=torch.float64)) @ v[:, :k].t()


def inputs(n: int, inp: int, seed: int) -> torch.Tensor:
    """Correlated calibration inputs (n, in): a seeded mixing of Gaussian columns."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, inp, generator=gen, dtype=torch.float64) @ torch.randn(inp, inp, generator=gen,
                                                                               dtype=torch.float64)


def error(w, a, b, gram=None) -> float:
    """||(W - B A) L||_F / ||W L||_F, directly."""
    d = w - b.double() @ a.double()
    if gram is None:
        return float(d.norm() / w.norm())
    return float(((d @ gram) * d).sum().sqrt() / ((w @ gram) * w).sum().sqrt())


SHAPES = [(12, 8, 1), (8, 12, 3), (30, 20, 5), (20, 30, 2), (16, 16, 8)]


@pytest.mark.parametrize("out, inp, rank", SHAPES, ids=[f"{o}x{i}-r{r}" for o, i, r in SHAPES])
@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated"])
def test_als_reaches_the_svd_optimum(out, inp, rank, calibrated):
    w = spectrum_matrix(out, inp, seed=out * inp + rank)
    gram = None
    if calibrated:
        x = inputs(3 * inp, inp, seed=rank)
        gram = x.t() @ x
    fit = als_factors(w, rank, gram, cfg=ALSConfig(tol=1e-12, max_sweeps=500))
    a_opt, b_opt = whitened_svd(w, gram, rank) if calibrated else truncated_svd(w, rank)
    best = error(w, a_opt, b_opt, gram)
    assert fit.converged
    assert error(w, fit.a, fit.b, gram) == pytest.approx(best, rel=1e-6, abs=1e-12)
    assert fit.errors[-1] == pytest.approx(best, rel=1e-6, abs=1e-9), "the error ALS reports is the true one"
    assert all(later <= earlier + 1e-12 for earlier, later in zip(fit.errors, fit.errors[1:])), "ALS never goes up"


@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated"])
def test_a_warm_start_at_the_optimum_stays_there(calibrated):
    w = spectrum_matrix(24, 18, seed=7)
    x = inputs(60, 18, seed=8)
    gram = x.t() @ x if calibrated else None
    a_opt, b_opt = whitened_svd(w, gram, 4) if calibrated else truncated_svd(w, 4)
    fit = als_factors(w, 4, gram, init=a_opt)
    assert len(fit.errors) == 2 and fit.converged, "one sweep to confirm, the second sees no change"
    assert fit.errors[0] == pytest.approx(error(w, a_opt, b_opt, gram), rel=1e-9)
    torch.testing.assert_close(fit.b.double() @ fit.a.double(), b_opt.double() @ a_opt.double(), atol=1e-7, rtol=1e-6)


def test_a_warm_start_after_a_shift_needs_fewer_sweeps_than_a_cold_start():
    w = spectrum_matrix(40, 30, seed=1, decay=0.9)
    old = inputs(90, 30, seed=2)
    new = old + 0.2 * inputs(90, 30, seed=3)  # the same kind of data, shifted
    cfg = ALSConfig(tol=1e-10, max_sweeps=2000)
    start = als_factors(w, 6, old.t() @ old, cfg=cfg).a
    warm = als_factors(w, 6, new.t() @ new, init=start, cfg=cfg)
    cold = als_factors(w, 6, new.t() @ new, cfg=cfg)
    assert warm.converged and cold.converged
    assert warm.errors[-1] == pytest.approx(cold.errors[-1], rel=1e-6)
    best = cold.errors[-1]
    within = [next(k for k, e in enumerate(fit.errors, 1) if e <= best * (1 + 1e-3)) for fit in (warm, cold)]
    assert within[0] <= within[1] / 2, f"sweeps to within 1e-3 of the optimum: warm {within[0]}, cold {within[1]}"
    assert len(warm.errors) < len(cold.errors)


def test_the_factors_keep_the_weight_s_dtype_and_device():
    w = spectrum_matrix(10, 8, seed=0).to(torch.bfloat16)
    fit = als_factors(w, 3)
    assert fit.a.dtype == fit.b.dtype == torch.bfloat16 and fit.a.device == w.device
    assert fit.a.shape == (3, 8) and fit.b.shape == (10, 3)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).eval()


@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated"])
def test_svd_compress_with_als_gives_the_svd_solver_s_model(calibrated):
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    calibration = [x[:32], x[32:]] if calibrated else None
    svd = lk.svd_compress(mlp(), rank=3, calibration=calibration)
    als = lk.svd_compress(mlp(), rank=3, calibration=calibration, solver="als", als=ALSConfig(tol=1e-12, max_sweeps=2000))
    assert isinstance(als[0], lk.LowRankLinear) and isinstance(als[2], lk.LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(als(x), svd(x), atol=1e-4, rtol=1e-4)


def test_svd_compress_warm_starts_from_an_earlier_compressed_model():
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    previous = lk.svd_compress(mlp(), rank=3, calibration=[x])
    refit = lk.svd_compress(mlp(), rank=3, calibration=[x], solver="als", warm_start=previous)
    with torch.no_grad():
        torch.testing.assert_close(refit(x), previous(x), atol=1e-4, rtol=1e-4)


# -- refusals ---------------------------------------------------------------------------------------
def rank_two(out: int = 8, inp: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(out, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, inp, generator=gen, dtype=torch.float64)


FIT_REFUSALS = [
    ("rank above the matrix's rank", lambda: als_factors(rank_two(), 3), "singular"),
    ("rank above min(out, in)", lambda: als_factors(rank_two(), 7), "rank 7 > min"),
    ("NaN in the weight", lambda: als_factors(torch.full((4, 4), float("nan")), 2), "NaN or inf"),
    ("singular Gram", lambda: als_factors(spectrum_matrix(8, 6, 0), 3, gram=inputs(2, 6, 0).t() @ inputs(2, 6, 0)),
     "singular"),
    ("warm start of another shape", lambda: als_factors(spectrum_matrix(8, 6, 0), 3, init=torch.zeros(2, 6)), "shape"),
    ("zero weight", lambda: als_factors(torch.zeros(5, 4), 2), "zero"),
]


@pytest.mark.parametrize("case, call, message", FIT_REFUSALS, ids=[c[0] for c in FIT_REFUSALS])
def test_als_refuses_what_it_cannot_fit(case, call, message):
    with pytest.raises(ALSError, match=message):
        call()


def rank_two_mlp():
    model = mlp()
    with torch.no_grad():
        model[0].weight.copy_(rank_two(10, 12).float())
    return model


COMPRESS_REFUSALS = [
    ("rank above a layer's rank", rank_two_mlp, dict(rank=3, solver="als"), ALSError, "layer '0'.*singular"),
    ("energy with ALS", mlp, dict(energy=0.9, solver="als"), ValueError, "needs rank="),
    ("an unknown solver", mlp, dict(rank=3, solver="qr"), ValueError, "solver='qr'"),
    ("als= without ALS", mlp, dict(rank=3, als=ALSConfig()), ValueError, "solver='als'"),
    ("a warm start that is not low-rank", mlp, dict(rank=3, solver="als", warm_start=mlp()), ValueError,
     "no low-rank layer at '0'"),
    ("a warm start of another rank", mlp, dict(rank=2, solver="als", warm_start=lk.svd_compress(mlp(), rank=3)),
     ValueError, r"shape \(3, 12\)"),
]


@pytest.mark.parametrize("case, factory, kwargs, error, message", COMPRESS_REFUSALS, ids=[c[0] for c in COMPRESS_REFUSALS])
def test_svd_compress_refuses_bad_als_input_and_leaves_the_model_unchanged(case, factory, kwargs, error, message):
    model = factory()
    before = state_snapshot(model)
    with pytest.raises(error, match=message):
        lk.svd_compress(model, **kwargs)
    assert_same_state(model, before)


@pytest.mark.parametrize("field, value", [("tol", -1.0), ("max_sweeps", 0), ("seed", -1), ("precision", "float16")])
def test_a_bad_als_setting_is_refused_by_its_config(field, value):
    with pytest.raises((TypeError, ValueError), match=field):
        ALSConfig(**{field: value})
