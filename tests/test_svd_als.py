"""svd-demo's ALS part (experiments/svd_als.py) on a tiny seeded model: the rows it records are what the solvers
give, the warm start is measured against the rotated optimum, and the report renders them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.compress import truncated_svd, whitened_svd
from lorakit.compress.svd import calibration_grams
from lorakit.experiments import svd_als
from lorakit.experiments.stream_data import rotate

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)).eval()


def images():
    """Smooth seeded 8 x 8 'images' (a rotation moves their pixels, as it does a digit's)."""
    x = torch.randn(200, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)


def test_convergence_rows_reach_both_optima_and_the_warm_start_starts_from_the_earlier_optimum(tmp_path):
    found = svd_als.convergence(tiny(), ["1", "3"], images(), ranks=[3], sweeps=200, shifts=[20.0],
                                within=1e-3, seeds=[0, 1], fill=0.0)
    assert set(found) == {"1 r=3", "3 r=3"}
    for row in found.values():
        for kind in ("plain", "calibrated"):
            assert row[kind]["sweeps_within"] is not None and abs(row[kind]["final_excess"]) < 1e-6
            assert row[kind]["errors"][-1] >= row[kind]["optimum"] * (1 - 1e-9), "nothing beats the optimum"
        shift = row["shifts"]["20.0"]
        assert len(shift["cold_sweeps"]) == 2 and shift["warm"][-1] == pytest.approx(shift["optimum"], rel=1e-6)
    model = tiny()
    w = model[1].weight.detach().double()
    a, b = truncated_svd(w, 3)
    assert found["1 r=3"]["plain"]["optimum"] == pytest.approx(svd_als.relative_error(w, a, b), rel=1e-12)
    old = calibration_grams(model, ["1"], [images()])["1"]
    new = calibration_grams(model, ["1"], [rotate(images(), 20.0, 0.0)])["1"]
    start = whitened_svd(w, old, 3)[0].double()  # the first warm sweep: the best B for the old optimum's A
    b = w @ new @ start.t() @ torch.linalg.inv(start @ new @ start.t())
    first = svd_als.relative_error(w, start, b, new)
    assert found["1 r=3"]["shifts"]["20.0"]["warm"][0] == pytest.approx(first, rel=1e-9)
    found["1 r=3"]["shifts"]["20.0"]["cold"].pop()  # runs that stop at different sweeps still plot
    svd_als.plot(tmp_path / "als.png", found)
    assert (tmp_path / "als.png").stat().st_size > 10_000


def test_timing_picks_iterations_that_reach_the_optimum():
    w = svd_als.large_matrix(48, seed=0)
    assert torch.allclose(torch.linalg.svdvals(w.double()), 1 / torch.arange(1, 49, dtype=torch.float64), atol=1e-5)
    row = svd_als.time_at_equal_error(w, rank=4, within=1e-3, repeats=1)
    assert row["als_error"] <= row["optimum"] * (1 + 1e-3) + 1e-7
    assert row["lowrank_error"] <= row["optimum"] * (1 + 1e-3) + 1e-7
    assert set(row["seconds"]) == {"svd", "svd_lowrank", "als"} and row["als_sweeps"] >= 1


def test_sweeps_within_is_the_first_sweep_under_the_bound():
    assert svd_als.sweeps_within([2.0, 1.01, 1.0005, 1.0], 1.0, 1e-3) == 3
    assert svd_als.sweeps_within([2.0, 1.5], 1.0, 1e-3) is None
