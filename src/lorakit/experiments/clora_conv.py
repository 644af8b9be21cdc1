"""``lorakit run clora-conv``: C-LoRA on a VGG-style conv net, against SVD at equal budget (SEEDS.md B, VGG16).

Per seed: train :func:`~lorakit.models.vgg_small` dense on the first ``train_size`` training images of
Fashion-MNIST (Debian's ``dataset-fashion-mnist``), or of CIFAR-10 with ``--dataset cifar10 --data-dir DIR``. Then,
per rank r, compress every convolution and ``classifier.fc1`` (as the seed compressed VGG16's convs and dense
layers) -- every one of them that rank r makes smaller: ``conv1_1`` (W is 32 x 9 on one input channel) stays dense
from r = 7 on -- with each variant of :mod:`.compress_cells`:

- C-LoRA ``noise+bias`` and ``wds`` (decay only), init ``svd`` and ``random``, with the seed's VGG schedule: W
  decays from 10 % to 90 % of the steps;
- ``svd``; ``svd+finetune`` and ``asvd+finetune``, trained with the same epochs (so steps), learning rate and batch
  as C-LoRA: an equal budget.

The output layer ``classifier.fc2`` stays dense and trains in every compressed cell (C-LoRA: ``modules_to_save``).

Ratios, per row (as clora-table): ``compression_ratio`` = (A + B + C of the compressed layers) / all parameters of
the dense model; ``model_ratio`` = all parameters of the compressed model / the dense one's; ``file_ratio`` =
safetensors bytes / the dense model's. The plain ``svd`` rows carry ``inference_ratio``: time of the compressed model
/ the dense one on a batch of 256 test images, eval mode, medians of interleaved rounds.

**Budget.** The seed trained an ImageNet-pretrained VGG16 on CIFAR-10; here everything trains from scratch on
2 CPU cores, so the defaults are shortened to fit one run of 3 seeds x 2 ranks x 7 cells in under an hour: the first
20,000 training images, dense 4 epochs, every compressed cell 2 epochs (batch 64, Adam lr 1e-3), asvd calibrated on
512 images. A timing probe (2,000 images, 1 thread, on a machine shared by five agents) took per training image
3.9 ms dense, 5.3 ms C-LoRA noise+bias and 1.2 ms SVD + fine-tune, and ~24 s per row for the 10,000-image test and
the rest; divided by 2.5 for a quiet machine that is ~50 min for the default run with 1 thread, less with 2.
The report says which settings a run used.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..data.vision import load_cifar10, load_fashion_mnist, to_float
from ..models import vgg_small
from .compress_cells import Fit, calibration_batches, compressible_targets
from .compress_report import TABLE_FILES, distill_note, result_sections
from .compress_task import CompressionConfig, TensorTask, add_compression_arguments, run_table
from .harness import flag, run_experiment

DESCRIPTION = "C-LoRA on a VGG-style conv net (Fashion-MNIST or CIFAR-10) against SVD + fine-tune at equal budget."

LOADERS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}
REFERENCE_NOTE = ("Seed 002 compressed an ImageNet-pretrained VGG16 (18.9M parameters) fine-tuned on CIFAR-10: dense "
             "85.36 %, C-LoRA about 75-77.5 % at ratios of 6.9-15.3 % (all convs and two dense layers). Another "
             "network and data set: their losses (8-10 pp) are the point of comparison, not their accuracies.")


@dataclass
class CLoRAConvConfig(CompressionConfig):
    """The images and vgg_small's shape; then the common fields (:class:`~.compress_task.CompressionConfig`) whose
    defaults this experiment sizes for 2 CPU cores (the budget in the module docstring) or takes from the seed."""

    dataset: str = flag("fashion-mnist", choices=list(LOADERS))
    """'fashion-mnist' or 'cifar10' (needs --data-dir, or LORAKIT_DATA, holding cifar-10-batches-py)."""
    data_dir: Optional[str] = None
    train_size: int = 20000
    """The first train_size training images train."""
    test_size: Optional[int] = None
    """The first test_size test images score (None: all 10,000)."""
    widths: list[int] = field(default_factory=lambda: [32, 64])
    """Channels of vgg_small's conv blocks (two 3x3 convs each, then a 2x2 max-pool)."""
    hidden: int = 128
    """Width of classifier.fc1."""
    # A field redeclared here keeps its place in the common fields (and in results.json's config).
    dense_epochs: float = 4.0
    batch_size: int = 64
    decay_start: float = 0.1
    """The seed's VGG schedule: W decays from 10 % to 90 % of the steps."""
    decay_end: float = 0.9
    calibration_size: int = 512
    ranks: list[int] = field(default_factory=lambda: [6, 11])
    """Rank of every compressed layer: 6 gives ~7.8 % of the default net's parameters, 11 ~13.9 %."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset not in LOADERS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(LOADERS)}")
        if not self.widths or any(w < 1 for w in self.widths) or self.hidden < 1:
            raise ValueError(f"widths and hidden must be positive, got widths={self.widths}, hidden={self.hidden}")
        if self.train_size < 1 or (self.test_size is not None and self.test_size < 1):
            raise ValueError(f"train_size and test_size must be >= 1 (leave test_size out for all test images), got "
                             f"{self.train_size} and {self.test_size}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_compression_arguments(parser, CLoRAConvConfig(), "clora-conv", "dataset", "data_dir", "train_size",
                              "test_size", "widths", "hidden", help={
                                  "test_size": "first N test images (default: all)",
                                  "widths": "conv block widths, comma-separated"})


def main(args: argparse.Namespace) -> int:
    return run_experiment(args, CLoRAConvConfig, "clora-conv", run, TABLE_FILES)


# -- the pieces -----------------------------------------------------------------------------------
def load_data(cfg: CLoRAConvConfig):
    """(train images, labels), (test images, labels); images float (N, C, H, W) in [0, 1]."""
    load = LOADERS[cfg.dataset]
    (images, labels), (test_images, test_labels) = load(cfg.data_dir, "train"), load(cfg.data_dir, "test")

    def as_float(x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        return x.unsqueeze(1) if x.ndim == 3 else x

    test_size = cfg.test_size or len(test_images)
    return ((as_float(images[: cfg.train_size]), labels[: cfg.train_size]),
            (as_float(test_images[:test_size]), test_labels[:test_size]))


def targets(model: nn.Module) -> list[str]:
    """Every convolution and the hidden dense layer."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)] + ["classifier.fc1"]


class ConvTask(TensorTask):
    """The :class:`~.compress_cells.Task` of this experiment: the images, vgg_small, Adam."""

    head = ["classifier.fc2"]
    ratio_of_targets = False  # as clora-table: the compressed layers' parameters / the whole dense model's

    def __init__(self, cfg: CLoRAConvConfig) -> None:
        self.cfg = cfg
        self.data, self.test = load_data(cfg)
        self.channels = self.data[0].shape[1]
        model = self.build(0)
        self.by_rank = {rank: compressible_targets(model, targets(model), rank) for rank in cfg.ranks}
        empty = [rank for rank, paths in self.by_rank.items() if not paths]
        if empty:  # before anything trains
            raise ValueError(f"ranks {empty} compress none of {targets(model)} (r (in + out) must be < in * out "
                             "for a layer's (out, in) weight); choose smaller ranks")

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return vgg_small(in_channels=self.channels, widths=tuple(self.cfg.widths), hidden=self.cfg.hidden)

    def dense(self, seed: int) -> tuple[nn.Module, str, Fit]:
        cfg = self.cfg
        name = (f"{cfg.dataset}-w{'-'.join(map(str, cfg.widths))}-h{cfg.hidden}-n{cfg.train_size}-seed{seed}-"
                f"epochs{cfg.dense_epochs:g}-batch{cfg.batch_size}-lr{cfg.lr:g}")
        return self.build(seed), name, self._fit(cfg.dense_epochs, seed)

    def layers(self, rank: int) -> list[str]:
        return self.by_rank[rank]

    def fit(self, seed: int, variant: str) -> Fit:
        return self._fit(self.cfg.epochs, seed)

    def calibration(self, seed: int) -> list:
        # batches of 64: asvd unfolds every conv input into (64 * H * W, in * 9) float64 rows to build X^T X
        return calibration_batches(self.data[0], self.cfg.calibration_size, seed, batch=64)


PROTOCOL = ("dataset", "train_size", "test_size", "widths", "hidden", "epochs", "dense_epochs", "batch_size", "lr",
            "alpha", "decay_start", "decay_end", "noise", "calibration_size", "timing_batch", "distill",
            "distill_temperature")


def run(cfg: CLoRAConvConfig, out: Path) -> dict:
    return run_table(cfg, out, PROTOCOL, ConvTask, render, "clora-conv", "vgg-small",
                     title=f"{cfg.dataset}, VGG-style CNN: accuracy vs compression (solid: svd init, dashed: random "
                           "init, dotted: SVD baselines)")


# -- the report -----------------------------------------------------------------------------------
def render(results: dict) -> str:
    cfg = results["config"]
    test = f"the first {cfg['test_size']:,}" if cfg["test_size"] else "all"
    lines = [f"# C-LoRA on a VGG-style conv net ({cfg['dataset']})", "",
             f"vgg_small, widths {cfg['widths']}, fc1 {cfg['hidden']}; every conv and classifier.fc1 compressed at "
             f"rank r (a layer that rank r would not make smaller stays dense), classifier.fc2 dense and trained. "
             f"Dense {cfg['dense_epochs']:g} epochs on the first {cfg['train_size']:,} training images; every compressed "
             f"cell {cfg['epochs']:g} epochs from the dense model of its seed (C-LoRA and SVD + fine-tune alike); batch "
             f"{cfg['batch_size']}, Adam lr {cfg['lr']}, alpha {cfg['alpha']:g}, decay {cfg['decay_start']:.0%} -> "
             f"{cfg['decay_end']:.0%} of the steps, asvd calibrated on {cfg['calibration_size']} images. Accuracy on "
             f"{test} test images, mean ± std over seeds {cfg['seeds']}. Wall time {results['wall_seconds'] / 60:.1f} "
             f"min with {cfg['threads']} thread(s) (summed over the processes that made the rows).{distill_note(cfg)}",
             "", "Ratio = (A + B + C of the compressed layers) / all dense parameters (as clora-table); model = all "
             "parameters of the compressed model / dense; file = compressed safetensors size / dense; time ratio = "
             "inference time compressed / dense (plain-svd rows, see below).", ""]
    layers = {r["rank"]: r["compressed_layers"] for r in results["rows"] if r.get("compressed_layers")}
    lines += [f"- rank {rank}: {', '.join(paths)}" for rank, paths in sorted(layers.items())] + [""]
    lines += result_sections(results, [(0.15, 2.0), (0.10, 4.0)], REFERENCE_NOTE)
    return "\n".join(lines)
