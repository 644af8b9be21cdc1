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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import report
from ..data.vision import load_fashion_mnist, to_float
from ..models import fmnist_mlp
from .compress_cells import ALL_VARIANTS, CLORA_VARIANTS, Fit, calibration_batches
from .compress_report import FINETUNED, TABLE_FILES, clora_vs_svd, distill_note, merged_runs, summary_table
from .compress_task import CompressionConfig, TensorTask, add_compression_arguments, run_table
from .harness import run_experiment

DESCRIPTION = "Reproduce and beat the seed's C-LoRA Fashion-MNIST table (C-LoRA variants, SVD baselines, dense)."

TARGETS = ["fc1", "fc2"]
REFERENCE_DENSE = 87.79
REFERENCE_TABLE = {  # rank -> (ratio, {variant: accuracy %}), SEEDS.md B
    16: (0.099, {"wds": 82.10, "bias": 82.73, "noise": 81.59, "noise+bias": 83.74}),
    32: (0.195, {"wds": 83.20, "bias": 82.55, "noise": 83.44, "noise+bias": 83.93}),
    64: (0.389, {"wds": 82.87, "bias": 83.68, "noise": 82.38, "noise+bias": 84.23}),
}


@dataclass
class CLoRATableConfig(CompressionConfig):
    """The common fields (:class:`~.compress_task.CompressionConfig`: variants, inits, ranks, seeds, epochs = C-LoRA
    epochs (the seed: 30), dense_epochs (the seed: 30), batch_size, lr, alpha, decay, noise, calibration_size,
    threads, resume, merge, report_only, timing, distillation) with the seed's defaults, and these."""

    variants: list[str] = field(default_factory=lambda: list(ALL_VARIANTS))
    epochs: float = 30.0
    threads: int = 1
    timing_rounds: int = 0
    """Interleaved rounds of the inference timing (on the plain-svd rows); 0 (the default here) skips it."""
    finetune_epochs: float = 3.0
    """Epochs of fine-tuning for svd+finetune and asvd+finetune."""
    train_head: bool = True
    """Train the uncompressed fc3 alongside (the seed's Keras model did); False freezes it."""
    train_size: int = 48000
    """The first train_size training images train; the seed used 48,000 (80 %)."""
    data_dir: Optional[str] = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_compression_arguments(parser, CLoRATableConfig(), "clora-table", "finetune_epochs", "train_head",
                              "train_size", "data_dir")


def main(args: argparse.Namespace) -> int:
    return run_experiment(args, CLoRATableConfig, "clora-table", run, TABLE_FILES)


# -- the pieces -----------------------------------------------------------------------------------
def load_data(cfg: CLoRATableConfig):
    """(train inputs, labels), (test inputs, labels); pixels / 255, flat (N, 784), as the seed."""
    images, labels = load_fashion_mnist(cfg.data_dir, "train")
    test_images, test_labels = load_fashion_mnist(cfg.data_dir, "test")
    train_x = to_float(images[: cfg.train_size]).flatten(1)
    return (train_x, labels[: cfg.train_size]), (to_float(test_images).flatten(1), test_labels)


class TableTask(TensorTask):
    """The :class:`~.compress_task.Task` of this experiment: Fashion-MNIST, the seed's MLP, Adam; the SVD fine-tunes
    train ``finetune_epochs``, C-LoRA ``epochs``."""

    ratio_of_targets = False  # the seed's ratio: A + B + C of fc1 and fc2 over the whole dense model

    def __init__(self, cfg: CLoRATableConfig) -> None:
        self.cfg = cfg
        self.data, self.test = load_data(cfg)
        self.head = ["fc3"] if cfg.train_head else []

    def dense(self, seed: int) -> tuple[nn.Module, str, Fit]:
        torch.manual_seed(seed)
        cfg = self.cfg
        name = f"seed{seed}-epochs{cfg.dense_epochs:g}-batch{cfg.batch_size}"
        return fmnist_mlp(), name, self._fit(cfg.dense_epochs, seed)

    def layers(self, rank: int) -> list[str]:
        return TARGETS

    def fit(self, seed: int, variant: str) -> Fit:
        return self._fit(self.cfg.finetune_epochs if variant in FINETUNED else self.cfg.epochs, seed)

    def calibration(self, seed: int) -> list:
        return calibration_batches(self.data[0], self.cfg.calibration_size, seed)


# -- the experiment -------------------------------------------------------------------------------
PROTOCOL = ("epochs", "dense_epochs", "finetune_epochs", "batch_size", "lr", "alpha", "decay_start", "decay_end",
            "noise", "train_head", "calibration_size", "train_size", "distill", "distill_temperature")


def run(cfg: CLoRATableConfig, out: Path) -> dict:
    reference_points = [(f"seed: {variant}", [100 * REFERENCE_TABLE[r][0] for r in REFERENCE_TABLE],
                         [REFERENCE_TABLE[r][1][variant] for r in REFERENCE_TABLE], marker)
                        for variant, marker in zip(CLORA_VARIANTS, "xs^D")]
    seed_numbers = {"dense": REFERENCE_DENSE,
                    "table": {str(r): {"ratio": v[0], **v[1]} for r, v in REFERENCE_TABLE.items()}}
    return run_table(cfg, out, PROTOCOL, TableTask, render, "clora-table", "fmnist-mlp",
                     {"seed_numbers": seed_numbers}, low=80.0, high=90, xticks=[10, 20, 40],
                     reference_points=reference_points, reference_dense=REFERENCE_DENSE,
                     title="Fashion-MNIST MLP: accuracy vs compression (solid: svd init, dashed: random init, "
                           "dotted: SVD baselines)")


def render(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    lines = ["# C-LoRA on Fashion-MNIST: the seed's table, reproduced and extended", "",
             f"Model 784-256-128-10 (ReLU), fc1 and fc2 compressed. Seeds {cfg['seeds']}; dense {cfg['dense_epochs']:g} "
             f"epochs, C-LoRA {cfg['epochs']:g} epochs, SVD fine-tune {cfg['finetune_epochs']:g} epochs; batch "
             f"{cfg['batch_size']}, Adam lr {cfg['lr']}, alpha {cfg['alpha']:g}, decay {cfg['decay_start']:.0%} -> "
             f"{cfg['decay_end']:.0%}, fc3 trained: {cfg['train_head']}. Accuracy on the 10,000 test images, mean ± std "
             f"over n seeds. Wall time {results['wall_seconds'] / 60:.1f} min (summed over the processes that made the rows)."
             f"{distill_note(cfg)}", "",
             "Ratio = (A + B + C of fc1, fc2) / 235,146; file = compressed safetensors size / dense size.", ""]
    reference_protocol = {"epochs": 30.0, "dense_epochs": 30.0, "batch_size": 30}
    changed = [f"{k} {cfg[k]:g} (seed: {v:g})" for k, v in reference_protocol.items() if cfg[k] != v]
    if changed:
        lines += [f"Shortened from the seed's protocol: {', '.join(changed)}. C-LoRA and the SVD baselines start "
                  "from the dense model of the same seed; the decay runs over the C-LoRA epochs.", ""]
    lines += [summary_table(summary, lambda s: REFERENCE_DENSE if s["variant"] == "dense"
                            else REFERENCE_TABLE.get(s["rank"], (0, {}))[1].get(s["variant"])), ""]
    best = {rank: max((s for s in summary if s["rank"] == rank), key=lambda s: s["accuracy_mean"])
            for rank in {s["rank"] for s in summary} - {None}}
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

