"""The seeds' SVD demo, then the same idea on a trained MNIST network.

1. Seed 0, ``W = randn(10, 2) @ randn(2, 10)`` has rank 2: ``B = U_2 S_2`` and ``A = V_2^T`` give
   ``B A x + b == W x + b`` with 40 numbers instead of 100 (and ``lorakit.svd_compress`` does the same).
2. RichBoyNet (seed 001's model) trained briefly on real MNIST: the singular-value spectrum of its hidden
   layers, the relative error ``||W - W_r||_F / ||W||_F`` against the rank r (Eckart–Young: the tail of the
   spectrum, checked against the measured error at a few ranks), and test accuracy when both hidden layers
   are truncated to rank r.
3. ALS beside SVD (:mod:`.svd_als`): convergence to both optima, the warm start after a data shift, time at equal
   error, and the compressed model's accuracy by solver.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from matplotlib.figure import Figure

import lorakit as lk
from .. import report
from ..data.vision import MNIST_MEAN_STD
from ..models import richboynet
from ..train import TrainConfig, evaluate, train
from . import svd_als
from .digit_finetune import load_data
from .harness import add_config_flags, add_out_argument, run_experiment
from .stream_data import black

DESCRIPTION = "The seeds' rank-2 SVD example, and the spectrum / rank-vs-error curve of a trained MNIST layer."
LAYERS = ["linear1", "linear2"]


@dataclass
class SVDDemoConfig:
    seed: int = 0
    epochs: float = 1.0
    """Training of RichBoyNet on MNIST before its layers are analysed."""
    batch_size: int = 100
    lr: float = 1e-3
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    """Ranks at which the error is measured and the truncated network is evaluated."""
    als_ranks: list[int] = field(default_factory=lambda: [16, 64])
    """Ranks of the ALS convergence and warm-start rows (each hidden layer)."""
    als_sweeps: int = 100
    """Sweeps per ALS curve."""
    calibration_size: int = 2000
    """Training images whose layer inputs make the calibration Gram matrices."""
    shifts: list[float] = field(default_factory=lambda: [10.0, 20.0, 40.0])
    """The data shifts of the warm start: the calibration images rotated by these angles (digit-stream: 20 apart)."""
    within: float = 1e-3
    """"Reached the optimum": error at most (1 + within) x the optimum's."""
    cold_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Random starts of the cold-start ALS after the shift."""
    timing_rank: int = 16
    timing_repeats: int = 3
    large_size: int = 4096
    """The large matrix of the timing rows (large_size x large_size)."""
    fmnist_epochs: float = 5.0
    """Training of clora-table's MLP on Fashion-MNIST before it is compressed by each solver."""
    fmnist_ranks: list[int] = field(default_factory=lambda: [16, 32, 64])
    threads: int = 1
    data_dir: Optional[str] = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, SVDDemoConfig())
    add_out_argument(parser, "svd-demo")


def main(args: argparse.Namespace) -> int:
    return run_experiment(args, SVDDemoConfig, "svd-demo", run,
                          "results.json, report.md, spectrum.png, rank_vs_error.png, als_convergence.png")


def rank2_example(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    w = torch.randn(10, 2) @ torch.randn(2, 10)
    b, x = torch.randn(10), torch.randn(10)
    u, s, vh = torch.linalg.svd(w)
    rank = int(torch.linalg.matrix_rank(w))
    big_b, big_a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]  # (10, r), (r, 10)
    layer = torch.nn.Linear(10, 10)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    model = lk.svd_compress(torch.nn.Sequential(layer), rank=rank, targets=["0"])
    return {"rank": rank, "W_numbers": w.numel(), "BA_numbers": big_b.numel() + big_a.numel(),
            "max_abs_difference_by_hand": float((w @ x + b - (big_b @ (big_a @ x) + b)).abs().max()),
            "max_abs_difference_svd_compress": float((w @ x + b - model(x)).detach().abs().max()),
            "singular_values": s.tolist()}


def run(cfg: SVDDemoConfig, out: Path) -> dict:
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    example = rank2_example(cfg.seed)
    train_set, test_set = load_data("richboynet", cfg.data_dir)
    torch.manual_seed(cfg.seed)
    model = richboynet()
    history = train(model, train_set, TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
                                                  seed=cfg.seed))
    dense_accuracy = evaluate(model, test_set).accuracy
    layers = {}
    for name in LAYERS:
        w = model.get_submodule(name).weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        tail = (s.pow(2).flip(0).cumsum(0).flip(0) / s.pow(2).sum()).sqrt()  # tail[r] = error of rank r
        measured = {r: float(torch.linalg.norm(w - (u[:, :r] * s[:r]) @ vh[:r]) / torch.linalg.norm(w))
                    for r in cfg.ranks if r < len(s)}
        layers[name] = {"shape": list(w.shape), "singular_values": s.tolist(),
                        "relative_error_by_rank": tail.tolist(), "measured_relative_error": measured}
    accuracy = {}
    for r in cfg.ranks:
        if r < min(min(layers[n]["shape"]) for n in LAYERS):
            accuracy[r] = evaluate(lk.svd_compress(copy.deepcopy(model), rank=r, targets=LAYERS), test_set).accuracy
    als = run_als(cfg, model, train_set.tensors[0][:cfg.calibration_size])
    results = {"experiment": "svd-demo", "config": asdict(cfg), "rank2_example": example,
               "model": "richboynet", "train": history.to_dict(), "dense_accuracy": dense_accuracy,
               "layers": layers, "accuracy_by_rank": accuracy, "als": als, "seconds": round(time.perf_counter() - start, 1)}
    report.write_results(out, results)
    _plot_spectrum(out / "spectrum.png", layers)
    _plot_rank_error(out / "rank_vs_error.png", layers, accuracy, dense_accuracy)
    svd_als.plot(out / "als_convergence.png", als["convergence"])
    report.write_report(out, render(results))
    return results


def run_als(cfg: SVDDemoConfig, model: torch.nn.Module, images: torch.Tensor) -> dict:
    weights = [model.get_submodule(n).weight.detach() for n in LAYERS]
    matrices = weights + [svd_als.large_matrix(cfg.large_size, cfg.seed)]
    return {"timing_repeats": cfg.timing_repeats,
            "convergence": svd_als.convergence(model, LAYERS, images, cfg.als_ranks, cfg.als_sweeps, cfg.shifts,
                                               cfg.within, cfg.cold_seeds, black(MNIST_MEAN_STD)),
            "timing": [svd_als.time_at_equal_error(w, cfg.timing_rank, cfg.within, cfg.timing_repeats)
                       for w in matrices],
            "accuracy": svd_als.solver_accuracy(cfg.fmnist_ranks, cfg.fmnist_epochs, cfg.calibration_size, cfg.seed,
                                                cfg.data_dir)}


def _plot_spectrum(path: Path, layers: dict) -> None:
    """Singular values on a log scale (report.line_plot has no log y axis, hence this small helper)."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for name, layer in layers.items():
        s = layer["singular_values"]
        ax.plot(range(1, len(s) + 1), s, label=f"{name} {tuple(layer['shape'])}")
    ax.set_yscale("log")
    _label(ax, "index i", "singular value s_i", "RichBoyNet on MNIST: singular-value spectrum")
    report.save_figure(fig, path)


def _plot_rank_error(path: Path, layers: dict, accuracy: dict, dense_accuracy: float) -> None:
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, layer in layers.items():
        curve = layer["relative_error_by_rank"]
        left.plot(range(len(curve)), curve, label=f"{name}: sqrt(tail of s^2) / ||W||")
        measured = layer["measured_relative_error"]
        left.scatter(list(measured), list(measured.values()), marker="x", zorder=3, label=f"{name}: measured")
    left.set_xscale("symlog", linthresh=1)
    _label(left, "rank r", "relative Frobenius error", "Truncation error (Eckart–Young)", fontsize=8)
    right.plot(list(accuracy), list(accuracy.values()), marker="o", label="linear1 + linear2 at rank r")
    right.axhline(dense_accuracy, color="grey", linestyle="--", label=f"dense {dense_accuracy:.2f} %")
    right.set_xscale("log", base=2)
    _label(right, "rank r", "test accuracy (%)", "MNIST accuracy after truncation (no fine-tune)", fontsize=8)
    report.save_figure(fig, path)


def _label(ax, xlabel: str, ylabel: str, title: str, **legend) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**legend)


def render(results: dict) -> str:
    ex, cfg = results["rank2_example"], results["config"]
    lines = ["# SVD demo", "", "## The seeds' rank-2 example", "",
             f"Seed {cfg['seed']}: `W = randn(10, 2) @ randn(2, 10)` has rank {ex['rank']}. With `B = U_2 diag(S_2)` "
             f"and `A = V_2^T`, `W x + b` and `B A x + b` differ by at most {ex['max_abs_difference_by_hand']:.2e} "
             f"(by hand) and {ex['max_abs_difference_svd_compress']:.2e} (`lorakit.svd_compress`). W holds "
             f"{ex['W_numbers']} numbers, B and A together {ex['BA_numbers']}.", "",
             "## A trained MNIST network", "",
             f"RichBoyNet trained {cfg['epochs']:g} epoch(s) on MNIST (batch {cfg['batch_size']}, Adam {cfg['lr']}): "
             f"{results['dense_accuracy']:.2f} % test accuracy.", ""]
    rows = []
    for r, acc in results["accuracy_by_rank"].items():
        errors = [results["layers"][n]["measured_relative_error"].get(r) for n in LAYERS]
        params = sum(int(r) * sum(results["layers"][n]["shape"]) for n in LAYERS)
        rows.append([int(r), *[None if e is None else round(e, 4) for e in errors], params, round(acc, 2)])
    lines += [report.markdown_table(["rank", "linear1 rel. error", "linear2 rel. error", "A+B numbers", "accuracy %"],
                                    rows, floatfmt=".4g"), "",
              f"Dense linear1 + linear2 weights: {sum(n * m for n, m in (results['layers'][k]['shape'] for k in LAYERS)):,} "
              "numbers. The measured errors equal the tails of the spectra (`rank_vs_error.png`, crosses on the "
              "curves); the spectrum is in `spectrum.png`.", ""]
    lines += svd_als.render(results, cfg["within"]) + [f"Wall time {results['seconds']} s."]
    return "\n".join(lines)
