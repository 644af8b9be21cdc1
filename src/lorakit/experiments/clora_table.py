"""The seed's C-LoRA table on Fashion-MNIST (SEEDS.md B), with SVD baselines, over ranks and seeds.

Per seed: train the dense 784-256-128-10 ReLU MLP on the first 48,000 training images (the seed's 80/20 split),
then from that dense model, per rank, compress ``fc1`` and ``fc2`` with each method and measure test accuracy:

- C-LoRA variants ``wds`` (decay only), ``bias`` (+ C), ``noise`` (+ scheduled noise), ``noise+bias``, each with
  ``init`` random (the seed's) or svd; trained for ``epochs`` with the decay schedule, then ``lorakit.compress``;
- ``svd`` (truncated, no training), ``svd+finetune``, ``asvd+finetune`` (activation-aware, calibrated on
  ``calibration_size`` training images), fine-tuned for ``finetune_epochs``.

With ``train_head`` the uncompressed output layer ``fc3`` trains too (as in the seed's Keras model, where only W
was frozen). Compression ratio = (A + B + C of fc1 and fc2) / all parameters of the dense model.
Rows are written to results.json as they finish; ``--resume`` skips rows already there.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import lorakit as lk
from .. import report
from ..data.vision import load_fashion_mnist, to_float
from ..models import fmnist_mlp
from ..train import TrainConfig, evaluate
from .compress_cells import (CLORA_VARIANTS, CellsConfig, Fit, Key, add_cell_arguments,
                             calibration_batches, clora_cell, file_size, parameter_count, run_cells,
                             svd_cell)
from .compress_report import TABLE_FILES, clora_vs_svd, merged_runs, plot_accuracy_vs_ratio, summarize, summary_table
from .harness import add_out_argument, cached_model, run_experiment

DESCRIPTION = "Reproduce and beat the seed's C-LoRA Fashion-MNIST table (C-LoRA variants, SVD baselines, dense)."

TARGETS = ["fc1", "fc2"]
REFERENCE_DENSE = 87.79
REFERENCE_TABLE = {  # rank -> (ratio, {variant: accuracy %}), SEEDS.md B
    16: (0.099, {"wds": 82.10, "bias": 82.73, "noise": 81.59, "noise+bias": 83.74}),
    32: (0.195, {"wds": 83.20, "bias": 82.55, "noise": 83.44, "noise+bias": 83.93}),
    64: (0.389, {"wds": 82.87, "bias": 83.68, "noise": 82.38, "noise+bias": 84.23}),
}


@dataclass
class CLoRATableConfig(CellsConfig):
    """The common fields (:class:`~.compress_cells.CellsConfig`: variants, inits, ranks, seeds, epochs = C-LoRA
    epochs (the seed: 30), dense_epochs (the seed: 30), batch_size, lr, alpha, decay, noise, calibration_size,
    threads, resume, merge, report_only) and these."""

    finetune_epochs: float = 3.0
    """Epochs of fine-tuning for svd+finetune and asvd+finetune."""
    train_head: bool = True
    """Train the uncompressed fc3 alongside (the seed's Keras model did); False freezes it."""
    train_size: int = 48000
    """The first train_size training images train; the seed used 48,000 (80 %)."""
    data_dir: Optional[str] = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CLoRATableConfig()
    add_cell_arguments(parser, d)
    parser.add_argument("--finetune-epochs", type=float, default=d.finetune_epochs)
    parser.add_argument("--train-head", action=argparse.BooleanOptionalAction, default=d.train_head)
    parser.add_argument("--train-size", type=int, default=d.train_size)
    parser.add_argument("--data-dir", default=None)
    add_out_argument(parser, "clora-table")


def main(args: argparse.Namespace) -> int:
    return run_experiment(args, CLoRATableConfig, "clora-table", run, TABLE_FILES)


# -- the pieces -----------------------------------------------------------------------------------
def load_data(cfg: CLoRATableConfig):
    """(train inputs, labels), (test inputs, labels); pixels / 255, flat (N, 784), as the seed."""
    images, labels = load_fashion_mnist(cfg.data_dir, "train")
    test_images, test_labels = load_fashion_mnist(cfg.data_dir, "test")
    train_x = to_float(images[: cfg.train_size]).flatten(1)
    return (train_x, labels[: cfg.train_size]), (to_float(test_images).flatten(1), test_labels)


def _fit(cfg: CLoRATableConfig, data, epochs: float, seed: int) -> Fit:
    return Fit(data, TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, epochs=epochs, seed=seed, log_every=100),
               parallel=cfg.parallel)


def dense_model(cfg: CLoRATableConfig, seed: int, data, out: Path) -> tuple[nn.Module, float]:
    """The seed's dense model trained with ``seed``; cached in OUT so a resumed run reuses it."""
    torch.manual_seed(seed)
    model = fmnist_mlp()
    path = out / "dense" / f"seed{seed}-epochs{cfg.dense_epochs:g}-batch{cfg.batch_size}.safetensors"
    return model, cached_model(path, model, _fit(cfg, data, cfg.dense_epochs, seed))


def compressed_parameters(model: nn.Module) -> int:
    """A + B + C of the compressed layers."""
    return parameter_count(model, TARGETS)


def run_clora(cfg: CLoRATableConfig, dense: nn.Module, variant: str, init: str, rank: int, seed: int, data):
    noise, bias = CLORA_VARIANTS[variant]
    clora = lk.CLoRAConfig(rank=rank, alpha=cfg.alpha, targets=TARGETS, decay_start=cfg.decay_start,
                           decay_end=cfg.decay_end, noise=cfg.noise if noise != "none" else "none", bias=bias,
                           init=init, modules_to_save=["fc3"] if cfg.train_head else None)
    model, history = clora_cell(dense, clora, 1000 * seed + rank, _fit(cfg, data, cfg.epochs, seed))
    return model, history.seconds


def run_svd(cfg: CLoRATableConfig, dense: nn.Module, variant: str, rank: int, seed: int, data):
    calibration = calibration_batches(data[0], cfg.calibration_size, seed) if variant.startswith("asvd") else None
    return svd_cell(dense, variant, rank, TARGETS, _fit(cfg, data, cfg.finetune_epochs, seed),
                    ["fc3"] if cfg.train_head else [], calibration)


# -- the experiment -------------------------------------------------------------------------------
PROTOCOL = ("epochs", "dense_epochs", "finetune_epochs", "batch_size", "lr", "alpha", "decay_start", "decay_end",
            "noise", "train_head", "calibration_size", "train_size")


def run(cfg: CLoRATableConfig, out: Path) -> dict:
    loaded: dict = {}
    dense_by_seed: dict[int, tuple[nn.Module, dict]] = {}

    def make_row(key: Key) -> dict:
        variant, init, rank, seed = key
        if not loaded:
            loaded["data"], loaded["test"] = load_data(cfg)
        data, test = loaded["data"], loaded["test"]
        if seed not in dense_by_seed:
            model, seconds = dense_model(cfg, seed, data, out)
            total = sum(p.numel() for p in model.parameters())
            dense_by_seed[seed] = (model, {"accuracy": evaluate(model, test).accuracy, "parameters": total,
                                           "seconds": seconds, "file_bytes": file_size(model)})
        dense, info = dense_by_seed[seed]
        if variant == "dense":
            return {"variant": "dense", "init": None, "rank": None, "seed": seed, "accuracy": info["accuracy"],
                    "compression_ratio": 1.0, "parameters": info["parameters"], "train_seconds": info["seconds"],
                    "file_ratio": 1.0}
        if variant in CLORA_VARIANTS:
            model, seconds = run_clora(cfg, dense, variant, init, rank, seed, data)
        else:
            model, seconds = run_svd(cfg, dense, variant, rank, seed, data)
        return {"variant": variant, "init": init, "rank": rank, "seed": seed,
                "accuracy": evaluate(model, test).accuracy,
                "compression_ratio": compressed_parameters(model) / info["parameters"],
                "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": seconds,
                "file_ratio": file_size(model) / info["file_bytes"]}

    return run_cells(cfg, out, PROTOCOL, make_row, lambda c, rows, seconds, made_by, final: write(c, out, rows, seconds, made_by, final))


def write(cfg: CLoRATableConfig, out: Path, rows: list[dict], seconds: float, made_by: list | None = None,
          final: bool = True) -> dict:
    results = {"experiment": "clora-table", "model": "fmnist-mlp", "config": asdict(cfg), "made_by": made_by or [],
               "seed_numbers": {"dense": REFERENCE_DENSE,
                                "table": {str(r): {"ratio": v[0], **v[1]} for r, v in REFERENCE_TABLE.items()}},
               "wall_seconds": round(seconds, 1), "rows": rows, "summary": summarize(rows)}
    report.write_results(out, results)
    report.write_report(out, render(results))
    if final:
        plot(out / "accuracy_vs_ratio.png", results["summary"])
    return results


def render(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    lines = ["# C-LoRA on Fashion-MNIST: the seed's table, reproduced and extended", "",
             f"Model 784-256-128-10 (ReLU), fc1 and fc2 compressed. Seeds {cfg['seeds']}; dense {cfg['dense_epochs']:g} "
             f"epochs, C-LoRA {cfg['epochs']:g} epochs, SVD fine-tune {cfg['finetune_epochs']:g} epochs; batch "
             f"{cfg['batch_size']}, Adam lr {cfg['lr']}, alpha {cfg['alpha']:g}, decay {cfg['decay_start']:.0%} -> "
             f"{cfg['decay_end']:.0%}, fc3 trained: {cfg['train_head']}. Accuracy on the 10,000 test images, mean ± std "
             f"over n seeds. Wall time {results['wall_seconds'] / 60:.1f} min (summed over the processes that made the rows).", "",
             "Ratio = (A + B + C of fc1, fc2) / 235,146; file = compressed safetensors size / dense size.", ""]
    reference_protocol = {"epochs": 30.0, "dense_epochs": 30.0, "batch_size": 30}
    changed = [f"{k} {cfg[k]:g} (seed: {v:g})" for k, v in reference_protocol.items() if cfg[k] != v]
    if changed:
        lines += [f"Shortened from the seed's protocol: {', '.join(changed)}. C-LoRA and the SVD baselines start "
                  "from the dense model of the same seed; the decay runs over the C-LoRA epochs.", ""]
    def reference_value(s: dict):
        if s["variant"] == "dense":
            return REFERENCE_DENSE
        return REFERENCE_TABLE.get(s["rank"], (0, {}))[1].get(s["variant"])

    lines += [summary_table(summary, reference_value), ""]
    best = {}
    for s in summary:
        if s["rank"] is not None and (s["rank"] not in best or s["accuracy_mean"] > best[s["rank"]]["accuracy_mean"]):
            best[s["rank"]] = s
    if best:
        lines += ["## Best method per rank against the seed's best", ""]
        rows = [[r, b["method"], f"{b['accuracy_mean']:.2f}", max(REFERENCE_TABLE[r][1].values()) if r in REFERENCE_TABLE else None]
                for r, b in sorted(best.items())]
        lines += [report.markdown_table(["rank", "best method", "accuracy %", "seed's best %"], rows), ""]
    budget = ("equal budgets: every compressed cell trains the same epochs" if cfg["finetune_epochs"] == cfg["epochs"]
              else f"**unequal budgets**: C-LoRA {cfg['epochs']:g} epochs, the SVD fine-tunes {cfg['finetune_epochs']:g}")
    lines += ["## C-LoRA against SVD + fine-tune", "",
              f"The best method of each kind per rank by mean accuracy, seed by seed from the same dense model; "
              f"{budget}, the same learning rate and batch (the choice of the best of several methods favours the "
              "side with more methods):", "", *(clora_vs_svd(results["rows"]) or ["- no rank has both kinds"]), ""]
    lines += merged_runs(results["made_by"], "## Runs merged into this table", "Seeds and methods ran in separate "
                         "processes (same protocol), then merged with `--report-only --merge`:")
    return "\n".join(lines)


def plot(path: Path, summary: list[dict]) -> None:
    """Accuracy vs ratio, one line per method, the reference's points as black markers; y from 80 to 90 %."""
    reference_points = [(f"seed: {variant}", [100 * REFERENCE_TABLE[r][0] for r in REFERENCE_TABLE],
                         [REFERENCE_TABLE[r][1][variant] for r in REFERENCE_TABLE], marker)
                        for variant, marker in zip(CLORA_VARIANTS, "xs^D")]
    plot_accuracy_vs_ratio(path, summary, low=80.0, high=90, xticks=[10, 20, 40], reference_points=reference_points,
                           reference_dense=REFERENCE_DENSE, title="Fashion-MNIST MLP: accuracy vs compression (solid: "
                           "svd init, dashed: random init, dotted: SVD baselines)")
