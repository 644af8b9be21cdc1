"""svd-demo's ALS part (seed 003's "SVD or ALS", updated "as new data is encountered"), on real data.

1. **Error against sweeps.** ALS from a random start on the seed MLP's trained layers, against the Eckart-Young
   optimum (plain, the truncated SVD's error) and the whitened optimum (activation-aware: the layer inputs of
   MNIST training images).
2. **Warm start after a shift.** The calibration images rotated by each of ``shifts`` degrees (digit-stream's
   rotation; its stages are 20 degrees apart): ALS from the unrotated optimum's A against cold starts, in sweeps to
   within ``within`` of the rotated optimum.
3. **Time at equal error** (float32, interleaved repeats, medians): ``torch.linalg.svd``; ``torch.svd_lowrank``
   with the fewest power iterations that reach within ``within`` of the optimum; ALS with the fewest sweeps that
   do. On the two layers and on one large matrix (seeded, singular values 1/i, random orthogonal factors).
4. **The compressed model.** ``svd_compress(solver="als")`` against ``solver="svd"`` on clora-table's Fashion-MNIST
   MLP (``fmnist_mlp``), plain and activation-aware, by test accuracy.

A relative error is ``||(W - B A) L||_F / ||W L||_F`` (``L L^T = X^T X``; ``L = I`` plain); "within 1e-3" means
at most (1 + 1e-3) times the optimum's.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Optional

import torch
from matplotlib.figure import Figure
from torch import nn

import lorakit as lk
from .. import report
from ..compress import ALSConfig, als_factors, truncated_svd, whitened_svd
from ..compress.svd import calibration_grams
from ..data.vision import dataset
from ..models import fmnist_mlp
from ..train import TrainConfig, evaluate, train
from .stream_data import rotate


def relative_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gram: Optional[torch.Tensor] = None) -> float:
    d = w.double() - b.double() @ a.double()
    if gram is None:
        return float(d.norm() / w.double().norm())
    return float((((d @ gram) * d).sum() / ((w.double() @ gram) * w.double()).sum()).sqrt())


def sweeps_within(errors: list[float], best: float, within: float) -> Optional[int]:
    """The first sweep whose error is at most (1 + within) times ``best`` (None: never)."""
    return next((k for k, e in enumerate(errors, 1) if e <= best * (1 + within)), None)


# -- 1 and 2: convergence and the warm start -----------------------------------------------------------
def convergence(model: nn.Module, layers: list[str], images: torch.Tensor, ranks: list[int], sweeps: int,
                shifts: list[float], within: float, seeds: list[int], fill: float) -> dict:
    """Per layer and rank: ALS's error per sweep against the optimum, plain and calibrated; then each shift."""
    before = calibration_grams(model, layers, [images])
    after = {angle: calibration_grams(model, layers, [rotate(images, angle, fill)]) for angle in shifts}
    run_out = ALSConfig(tol=0.0, max_sweeps=sweeps)  # every sweep, for the curves
    found = {}
    for layer in layers:
        w = model.get_submodule(layer).weight.detach().double()
        for rank in ranks:
            row = {}
            for kind, gram in (("plain", None), ("calibrated", before[layer])):
                a, b = truncated_svd(w, rank) if gram is None else whitened_svd(w, gram, rank)
                best = relative_error(w, a, b, gram)
                errors = als_factors(w, rank, gram, cfg=run_out).errors
                row[kind] = {"optimum": best, "errors": errors, "sweeps_within": sweeps_within(errors, best, within),
                             "final_excess": errors[-1] / best - 1}
            start = whitened_svd(w, before[layer], rank)[0]  # the A an earlier svd_compress made from unrotated data
            row["shifts"] = {str(angle): _shift(w, rank, after[angle][layer], start, run_out, seeds, within)
                             for angle in shifts}
            found[f"{layer} r={rank}"] = row
    return found


def _shift(w: torch.Tensor, rank: int, gram: torch.Tensor, start: torch.Tensor, cfg: ALSConfig, seeds: list[int],
           within: float) -> dict:
    """After the shift: ALS from ``start`` (warm) and from random starts (cold), against the new optimum."""
    a, b = whitened_svd(w, gram, rank)
    best = relative_error(w, a, b, gram)
    warm = als_factors(w, rank, gram, init=start, cfg=cfg).errors
    cold = [als_factors(w, rank, gram, cfg=ALSConfig(tol=0.0, max_sweeps=cfg.max_sweeps, seed=s)).errors for s in seeds]
    return {"optimum": best, "warm": warm, "cold": cold[0], "warm_sweeps": sweeps_within(warm, best, within),
            "cold_sweeps": [sweeps_within(c, best, within) for c in cold]}


# -- 3: time at equal error ------------------------------------------------------------------------------
def large_matrix(size: int, seed: int) -> torch.Tensor:
    """A seeded float32 (size, size) matrix with singular values 1/i and random orthogonal factors."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(size, size, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(size, size, generator=gen))[0]
    return (u / torch.arange(1, size + 1, dtype=torch.float32)) @ v.t()


def _lowrank(w: torch.Tensor, rank: int, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, v = torch.svd_lowrank(w, q=min(rank + 8, min(w.shape)), niter=niter)
    return s[:rank, None] * v[:, :rank].t(), u[:, :rank]


def time_at_equal_error(w: torch.Tensor, rank: int, within: float, repeats: int) -> dict:
    """Seconds (medians of interleaved repeats) of each solver at the fewest iterations reaching ``within``."""
    w = w.float()
    s = torch.linalg.svdvals(w.double()) if w.numel() < 4e6 else torch.linalg.svdvals(w)
    best = float((s[rank:].double().pow(2).sum() / s.double().pow(2).sum()).sqrt())
    niter = next(n for n in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
                 if relative_error(w, *_lowrank(w, rank, n)) <= best * (1 + within))
    probe = als_factors(w, rank, cfg=ALSConfig(tol=0.0, max_sweeps=1000, precision="float32"))
    sweeps = sweeps_within(probe.errors, best, within)
    if sweeps is None:
        raise RuntimeError(f"ALS did not reach within {within} of the optimum in 1000 sweeps")
    als = ALSConfig(tol=0.0, max_sweeps=sweeps, precision="float32")
    cases: dict[str, Callable[[], object]] = {
        "svd": lambda: torch.linalg.svd(w, full_matrices=False),
        "svd_lowrank": lambda: _lowrank(w, rank, niter),
        "als": lambda: als_factors(w, rank, cfg=als),
    }
    seconds = interleaved(cases, repeats)
    fit = als_factors(w, rank, cfg=als)
    return {"shape": list(w.shape), "rank": rank, "optimum": best, "svd_lowrank_niter": niter, "als_sweeps": sweeps,
            "als_error": relative_error(w, fit.a, fit.b), "lowrank_error": relative_error(w, *_lowrank(w, rank, niter)),
            "seconds": seconds, "als_over_svd": seconds["als"] / seconds["svd"],
            "als_over_svd_lowrank": seconds["als"] / seconds["svd_lowrank"]}


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each case, timed A B C A B C ... after one warm-up call each."""
    for fn in cases.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


# -- 4: the compressed model -----------------------------------------------------------------------------
def solver_accuracy(ranks: list[int], epochs: float, calibration_size: int, seed: int, data_dir=None) -> dict:
    """Test accuracy of clora-table's MLP compressed by either solver (fc1 and fc2), plain and activation-aware."""
    train_set = dataset("fashion-mnist", "train", data_dir)
    test_set = dataset("fashion-mnist", "test", data_dir)
    torch.manual_seed(seed)
    model = fmnist_mlp()
    train(model, train_set, TrainConfig(lr=1e-3, batch_size=100, epochs=epochs, seed=seed))
    calibration = [train_set.tensors[0][:calibration_size]]
    rows = []
    for rank in ranks:
        for kind, data in (("plain", None), ("calibrated", calibration)):
            accuracy = {solver: evaluate(lk.svd_compress(copy.deepcopy(model), rank=rank, targets=["fc1", "fc2"],
                                                         calibration=data, solver=solver), test_set).accuracy
                        for solver in ("svd", "als")}
            rows.append({"rank": rank, "kind": kind, **accuracy, "als_minus_svd": accuracy["als"] - accuracy["svd"]})
    return {"dense_accuracy": evaluate(model, test_set).accuracy, "epochs": epochs, "rows": rows}


# -- the figure and the report ---------------------------------------------------------------------------
def plot(path, found: dict) -> None:
    fig = Figure(figsize=(15, 4.5))
    panels = [fig.add_subplot(1, 3, i) for i in (1, 2, 3)]
    for name, row in found.items():
        for ax, kind in zip(panels, ("plain", "calibrated")):
            excess = [max(e / row[kind]["optimum"] - 1, 1e-16) for e in row[kind]["errors"]]
            ax.plot(range(1, len(excess) + 1), excess, label=name)
        angle, shift = next(iter(row["shifts"].items()))
        warm, cold = ([max(e / shift["optimum"] - 1, 1e-16) for e in shift[k]] for k in ("warm", "cold"))
        line, = panels[2].plot(range(1, len(warm) + 1), warm, label=f"{name} warm")  # a run stops once exact
        panels[2].plot(range(1, len(cold) + 1), cold, linestyle="--", color=line.get_color(), label=f"{name} cold")
    titles = ["ALS, plain: error / Eckart-Young optimum - 1", "ALS, activation-aware: error / whitened optimum - 1",
              f"Calibration images rotated {float(angle):g}°: warm (solid) vs cold start, vs the new optimum"]
    for ax, title in zip(panels, titles):
        ax.set_yscale("log")
        ax.axhline(1e-3, color="grey", linestyle=":", label="1e-3")
        ax.set_xlabel("sweep")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    report.save_figure(fig, path)


def _median(values: list) -> Optional[float]:
    found = [v for v in values if v is not None]
    return statistics.median(found) if len(found) == len(values) else None  # None: a start never got there


def render(results: dict, within: float) -> list[str]:
    als = results["als"]
    lines = ["## ALS beside SVD", "",
             f"Relative error `||(W - B A) L|| / ||W L||`; a sweep is one B solve and one A solve; \"within\" means at "
             f"most (1 + {within:g}) x the optimum. Curves: `als_convergence.png`.", ""]
    rows = [[name, round(row["plain"]["optimum"], 4), row["plain"]["sweeps_within"], f"{row['plain']['final_excess']:.1e}",
             round(row["calibrated"]["optimum"], 4), row["calibrated"]["sweeps_within"],
             f"{row['calibrated']['final_excess']:.1e}"] for name, row in als["convergence"].items()]
    lines += [report.markdown_table(["layer", "plain optimum", "sweeps within", "excess at the end",
                                     "calibrated optimum", "sweeps within", "excess at the end"], rows), ""]
    angles = list(next(iter(als["convergence"].values()))["shifts"])
    rows = [[name, *[f"{s['warm_sweeps']} / {_median(s['cold_sweeps'])}" for s in row["shifts"].values()]]
            for name, row in als["convergence"].items()]
    lines += ["After a shift (the calibration images rotated), sweeps to within the tolerance of the new whitened "
              "optimum: warm start (from the unrotated optimum) / cold start (median over random starts):", "",
              report.markdown_table(["layer", *[f"{a}°" for a in angles]], rows), ""]
    rows = [[f"{tuple(t['shape'])} r={t['rank']}", round(t["optimum"], 4), t["als_sweeps"], t["svd_lowrank_niter"],
             f"{t['seconds']['svd']:.3g}", f"{t['seconds']['svd_lowrank']:.3g}", f"{t['seconds']['als']:.3g}",
             round(t["als_over_svd"], 3), round(t["als_over_svd_lowrank"], 3)] for t in als["timing"]]
    lines += ["Time at equal error (float32, within the tolerance above; medians of "
              f"{als['timing_repeats']} interleaved repeats):", "",
              report.markdown_table(["matrix", "optimum", "ALS sweeps", "svd_lowrank niter", "linalg.svd s",
                                     "svd_lowrank s", "ALS s", "ALS / svd", "ALS / svd_lowrank"], rows), ""]
    acc = als["accuracy"]
    rows = [[r["rank"], r["kind"], round(r["svd"], 2), round(r["als"], 2), round(r["als_minus_svd"], 2)]
            for r in acc["rows"]]
    lines += [f"clora-table's MLP on Fashion-MNIST ({acc['epochs']:g} epochs, dense {acc['dense_accuracy']:.2f} %), "
              "fc1 and fc2 compressed by `svd_compress(solver=...)`, test accuracy %:", "",
              report.markdown_table(["rank", "kind", "svd", "als", "als - svd"], rows), ""]
    return lines
