"""The tables of clora-table, clora-conv and clora-transformer: an experiment describes its data, models and
training as a :class:`Task`; :func:`compression_rows` makes every (variant, init, rank, seed) row of
:mod:`.compress_cells` from it, and :func:`run_table` runs and writes the table.

Each row has ``accuracy``, ``compression_ratio`` (A + B + C of the compressed layers over the whole dense model, or
over those layers' dense parameters when ``Task.ratio_of_targets``), ``model_ratio`` (all parameters, compressed /
dense), ``file_ratio`` (safetensors bytes), ``train_seconds``, ``steps`` and ``compressed_layers``; the plain-svd
rows add ``inference_ratio`` (compressed / dense time of a forward pass, interleaved, medians). With ``distill``,
every compressed cell also learns from the dense model's outputs (:func:`lorakit.train.distillation_loss`).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Protocol

from torch import nn

import lorakit as lk
from ..losses import distillation_loss
from ..train import TrainConfig, evaluate
from .compress_cells import (ALL_VARIANTS, CLORA_VARIANTS, CellsConfig, Fit, Key, clora_cell, file_size,
                             inference_ratio, parameter_count, run_cells, svd_cell)
from .compress_report import write_table
from .harness import add_config_flags, add_out_argument, cached_model


@dataclass
class CompressionConfig(CellsConfig):
    """:class:`CellsConfig` plus what :func:`compression_rows` needs: inference timing, cell states, a dense cache;
    by default the issue's variants (C-LoRA noise+bias and wds, plain SVD, SVD and asvd + fine-tune)."""

    variants: list[str] = field(default_factory=lambda: ["dense", "noise+bias", "wds", "svd", "svd+finetune",
                                                         "asvd+finetune"])
    epochs: float = 2.0
    """Epochs of every compressed cell: C-LoRA and the SVD fine-tunes alike (an equal budget)."""
    threads: int = 2
    timing_rounds: int = 7
    """Interleaved rounds of the inference timing (on the plain-svd rows); 0 skips it."""
    timing_batch: int = 256
    """Inputs per timed forward pass."""
    state_every: int = 200
    """Steps between saved training states of a cell (what --resume continues from)."""
    cache_dir: Optional[str] = None
    """Where the dense models are cached (default: OUT/dense)."""
    distill: float = 0.0
    """Weight of the dense model's soft targets in every compressed cell's loss (knowledge distillation, C-LoRA and
    the SVD fine-tunes alike); 0 trains on the labels alone."""
    distill_temperature: float = 2.0
    at_least_one: ClassVar[tuple[str, ...]] = ("batch_size", "timing_batch", "state_every")
    """The fields that must be >= 1 (an experiment adds its own)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1] (0: labels only), got {self.distill}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        for name in self.at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timing_rounds < 0:
            raise ValueError(f"timing_rounds must be >= 0 (0 skips the timing), got {self.timing_rounds}")


def add_compression_arguments(parser: argparse.ArgumentParser, d: CompressionConfig, experiment: str, *names: str,
                              help: Optional[dict[str, str]] = None) -> None:
    """The flags of :class:`CompressionConfig`'s fields and then of the experiment's own fields ``names``, with
    ``d``'s values as defaults (:func:`~.harness.add_config_flags`), then ``--out``."""
    add_config_flags(parser, d, *[f.name for f in fields(CompressionConfig)], *names, help={
        "variants": "comma-separated: " + ",".join(ALL_VARIANTS), "inits": "comma-separated: random,svd",
        "ranks": "comma-separated ranks", "seeds": "comma-separated seeds",
        "epochs": "C-LoRA training epochs (clora-conv, clora-transformer: the SVD fine-tunes' too)",
        "cache_dir": "dense model cache (default: OUT/dense)",
        "distill": "weight of the dense model's soft targets in every compressed cell's loss (0: labels only)",
        **(help or {})})
    add_out_argument(parser, experiment)


class Task(Protocol):
    """What an experiment supplies to :func:`compression_rows`: its data, models and training."""

    head: list[str]
    """Uncompressed modules that train in every compressed cell (C-LoRA: ``modules_to_save``)."""
    ratio_of_targets: bool
    """compression_ratio's denominator: the compressed layers' dense parameters (True) or the whole dense model's."""

    def dense(self, seed: int) -> tuple[nn.Module, str, Fit]:
        """The untrained dense model of ``seed``, the name it is cached under (what it depends on) and how it trains."""

    def layers(self, rank: int) -> list[str]:
        """The paths compressed at ``rank``."""

    def fit(self, seed: int, variant: str) -> Fit:
        """How a compressed cell of ``seed`` and ``variant`` trains (clora-conv and clora-transformer: C-LoRA and the
        SVD fine-tunes alike, an equal budget; clora-table: the seed's fewer epochs for the SVD fine-tunes)."""

    def calibration(self, seed: int) -> list:
        """asvd's calibration batches."""

    def accuracy(self, model: nn.Module) -> float:
        """Test accuracy in %."""

    def timing_input(self) -> Callable[[nn.Module], Any]:
        """One forward pass of a model on a batch of ``timing_batch`` test inputs."""


class TensorTask:
    """The part of a :class:`Task` whose data are ``(inputs, labels)`` tensors (clora-table, clora-conv): Adam on
    ``self.data``, a training state every ``state_every`` steps, test accuracy and timing on ``self.test``."""

    cfg: CompressionConfig
    data: tuple
    test: tuple

    def _fit(self, epochs: float, seed: int) -> Fit:
        cfg = self.cfg
        return Fit(self.data, TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, epochs=epochs, seed=seed,
                                          log_every=100, checkpoint_every=cfg.state_every), resume=cfg.resume,
                   parallel=cfg.parallel)

    def accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.test).accuracy

    def timing_input(self) -> Callable[[nn.Module], Any]:
        batch = self.test[0][: self.cfg.timing_batch]
        return lambda model: model(batch)


def run_table(cfg: CompressionConfig, out: Path, protocol: tuple[str, ...], make_task: Callable[[Any], Task],
              render: Callable[[dict], str], experiment: str, model: str, extra: Optional[dict] = None,
              **plot_options) -> dict:
    """:func:`run_cells` over the rows of ``make_task(cfg)`` (:func:`compression_rows`), the table written after each
    row by :func:`~.compress_report.write_table`; results.json starts with experiment, model, config and ``extra``."""
    def write(c: CompressionConfig, *table) -> dict:
        head = {"experiment": experiment, "model": model, "config": asdict(c), **(extra or {})}
        return write_table(out, head, *table, render, **plot_options)

    return run_cells(cfg, out, protocol, compression_rows(lambda: make_task(cfg), cfg, out), write)


def compression_rows(make_task: Callable[[], Task], cfg: CompressionConfig, out: Path) -> Callable[[Key], dict]:
    """``make_row`` for :func:`run_cells`. The task is made (its data loaded) at the first row that needs it; the
    dense models are cached in ``cache_dir`` (default OUT/dense), so a resumed run trains none again."""
    made: dict = {}
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "dense"

    def make_row(key: Key) -> dict:
        variant, init, rank, seed = key
        task = made.get("task") or made.setdefault("task", make_task())
        if seed not in made:
            model, name, fit = task.dense(seed)
            seconds = cached_model(cache / f"{name}.safetensors", model, fit, state_path=cache / f"{name}.state")
            model.eval()  # the teacher of distillation; every cell trains a copy, in train mode
            made[seed] = (model, {"accuracy": task.accuracy(model), "seconds": seconds, "file_bytes": file_size(model),
                                  "parameters": sum(p.numel() for p in model.parameters())})
        dense, info = made[seed]
        if variant == "dense":
            return {"variant": "dense", "init": None, "rank": None, "seed": seed, "accuracy": info["accuracy"],
                    "compression_ratio": 1.0, "model_ratio": 1.0, "file_ratio": 1.0, "parameters": info["parameters"],
                    "train_seconds": info["seconds"]}
        layers, fit = task.layers(rank), task.fit(seed, variant)
        if cfg.distill > 0:
            fit = replace(fit, options={**fit.options,
                                        "loss_fn": distillation_loss(dense, cfg.distill, cfg.distill_temperature)})
        state = out / "cells" / f"{variant}-{init or 'none'}-r{rank}-seed{seed}.state"
        if variant in CLORA_VARIANTS:
            noise, bias = CLORA_VARIANTS[variant]
            clora = lk.CLoRAConfig(rank=rank, alpha=cfg.alpha, targets=layers, decay_start=cfg.decay_start,
                                   decay_end=cfg.decay_end, noise=cfg.noise if noise != "none" else "none", bias=bias,
                                   init=init, modules_to_save=task.head)
            model, history = clora_cell(dense, clora, 1000 * seed + rank, fit, state)
            seconds = history.seconds
        else:
            calibration = task.calibration(seed) if variant.startswith("asvd") else None
            model, seconds = svd_cell(dense, variant, rank, layers, fit, task.head, calibration, state)
        parameters = sum(p.numel() for p in model.parameters())
        denominator = parameter_count(dense, layers) if task.ratio_of_targets else info["parameters"]
        row = {"variant": variant, "init": init, "rank": rank, "seed": seed, "accuracy": task.accuracy(model),
               "compression_ratio": parameter_count(model, layers) / denominator,
               "model_ratio": parameters / info["parameters"], "file_ratio": file_size(model) / info["file_bytes"],
               "parameters": parameters, "train_seconds": seconds, "steps": 0 if variant == "svd" else fit.steps,
               "compressed_layers": layers}
        if variant == "svd" and cfg.timing_rounds > 0:
            row["inference_ratio"] = inference_ratio(dense, model, task.timing_input(), cfg.timing_rounds)
        return row

    return make_row
