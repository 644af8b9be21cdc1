"""``lorakit run llm-compare``: seed 004's question on a generative model. SmolLM2 (or any causal-LM folder) learns
WordNet supersenses by instruction tuning, scored by exact match of its greedy answer (:mod:`.llm_compare_task`).

Rows: zero-shot; LoRA, DoRA and QLoRA (4-bit NF4 base), lorakit and PEFT; soft prompt, lorakit and PEFT;
bottleneck adapter, lorakit (AdapterHub is not run: see ``ADAPTERHUB_REASON``); full fine-tuning, lorakit.

1. **Sweep.** Each method's lorakit row trains at every rate of its grid (the first seed) and is scored on the
   validation split carved from the training data; the best picks the rate its lorakit and PEFT rows then use.
2. **Cells.** Every (method, implementation, seed) trains for the same steps and batch and is scored once on test
   (:mod:`.llm_compare_cells`; one cell file each, ``--resume`` continues).
3. **Step times**: every trained row's model side by side in one process, one step each in turn, medians
   (:mod:`.llm_compare_timing`).
4. **Report** (:mod:`.llm_compare_report`): accuracy mean ± std, paired lorakit - PEFT differences, per-step loss
   traces from the same start, parameters, file sizes, step time, memory, example generations, seed 004 beside.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from .. import parallel
from .llm_compare_cells import ROWS, Setup, release_weights, run_cell
from .llm_compare_task import stratified_subset, write_jsonl
from .harness import add_config_flags, flag, parse_names, parse_rates, parse_seeds, start_hf_run
from .text_task import load_data, split_validation

DESCRIPTION = ("seed 004 on a causal LM: zero-shot, LoRA, QLoRA, soft prompt, adapter and full fine-tuning of SmolLM2 "
               "on WordNet supersenses by generation, lorakit beside PEFT")
METHODS = ("zero-shot", "lora", "dora", "qlora", "prompt", "adapter", "full")
ADAPTERHUB_REASON = ("AdapterHub (`adapters`) pins transformers 4.57, so it runs only in its own environment "
                     "(`make adapters-env`), driven by peft-compare's bridge `scripts/adapterhub_row.py`, which trains "
                     "a sequence classifier; it has no causal-LM job (chat-template data, answer-only loss, greedy "
                     "generation, a 4-bit base), so this row is not run and no number is given for it.")


@dataclass
class LLMCompareConfig:
    """The flags of ``lorakit run llm-compare``, one field each (lists stay comma-separated text, parsed by
    :func:`main` before any work), and the data set, which is fixed."""

    model: str = flag("smollm2", "'smollm2' or a local causal-LM folder")
    classes: Optional[str] = flag(None, "comma-separated WordNet noun classes (default: six)")
    per_class_train: int = flag(200, "training glosses per class (as peft-compare)")
    per_class_val: int = flag(20, "validation examples per class, from training")
    per_class_test: int = flag(200, "test glosses per class of the split (as peft-compare; --test-size scores a subset)")
    test_size: int = flag(1200, "test examples scored, stratified per class")
    methods: str = flag(",".join(METHODS), "comma-separated subset of " + ",".join(METHODS))
    seeds: str = flag("0,1,2", "comma-separated training seeds (the first one sweeps)")
    steps: int = flag(40, "optimizer steps, every trained row")
    batch_size: int = flag(8, "examples per step, every trained row")
    max_length: int = flag(192, "tokens kept per example")
    rank: int = flag(8, "LoRA rank, on every linear layer but the head")
    alpha: float = flag(16.0, "LoRA alpha (scale alpha / rank)")
    num_tokens: int = flag(10, "soft prompt length")
    bottleneck: int = flag(16, "adapter width, after each block's MLP")
    lr: dict[str, str] = flag({"lora": "3e-4,1e-3", "dora": "3e-4,1e-3", "qlora": "3e-4,1e-3", "prompt": "3e-2,1e-1",
                               "adapter": "3e-4,1e-3", "full": "2e-5,5e-5"}, "{}: learning rates to sweep (one: no sweep)")
    """Each trained method's grid: ``--lr-lora``, ``--lr-dora``, ... (results.json's config: ``lr``, by method)."""
    timing_rounds: int = flag(5, "rounds of side-by-side training steps that time the rows (0: none)")
    eval_batch_size: int = flag(16, "prompts generated at once")
    threads: int = flag(2, "torch threads")
    save_every: int = flag(20, "steps between saved training states (resume)")
    resume: bool = flag(False, "reuse finished cells in --out, continue stopped ones")
    out: Optional[str] = flag(None, "output folder (default runs/llm-compare-<time>)")
    dataset: str = "wordnet-supersense"
    """Not a flag: :func:`~.text_task.load_data` reads it (peft-compare's WordNet split)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, LLMCompareConfig(), *[f.name for f in fields(LLMCompareConfig) if f.name != "dataset"])


def prepare(cfg: LLMCompareConfig, out: Path) -> tuple[Setup, dict]:
    """The data (peft-compare's split), the training JSONL and the cells' shared settings."""
    train, test, label_names = load_data(cfg)
    train, validation = split_validation(train, cfg.per_class_val)
    test = stratified_subset(test, cfg.test_size)
    cells = out / "cells"
    if cells.is_dir() and any(cells.glob("*.json")) and not cfg.resume:
        raise ValueError(f"{out} already holds finished cells; pass --resume to continue that run, or another --out")
    settings = {"model": cfg.model, "steps": cfg.steps, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                "rank": cfg.rank, "alpha": cfg.alpha, "num_tokens": cfg.num_tokens, "bottleneck": cfg.bottleneck,
                "save_every": cfg.save_every, "classes": label_names, "train_size": len(train),
                "validation_size": len(validation), "test_size": len(test)}
    setup = Setup(cells, write_jsonl(cells / "train.jsonl", train), validation, test, settings, cfg.resume,
                  cfg.eval_batch_size)
    data = {"train_per_class": train.class_counts(), "validation_per_class": validation.class_counts(),
            "test_per_class": test.class_counts(), "test_ids": test.ids}
    return setup, data


def sweep(setup: Setup, methods: list[str], grids: dict, seed: int) -> tuple[dict, list[dict]]:
    """Each trained method's rate: the best validation accuracy of its lorakit row (ties: the first in the grid).
    The chosen cell is scored on test at once, so that a run stopped later need not keep its weights."""
    chosen, table = {}, []
    for method in methods:
        if method == "zero-shot":
            continue
        records = [run_cell(setup, method, "lorakit", seed, lr, validate=True) for lr in grids[method]]
        best = max(records, key=lambda r: r["validation"]["accuracy"])  # max keeps the first of equals
        chosen[method] = best["lr"]
        run_cell(setup, method, "lorakit", seed, best["lr"], test=True)
        table += [{"method": method, "lr": r["lr"], "validation_accuracy": r["validation"]["accuracy"],
                   "final_loss": r["losses"][-1] if r["losses"] else None, "chosen": r is best} for r in records]
        for r in records:
            if r is not best:
                release_weights(setup, r)
    return chosen, table


def measure_step_times(setup: Setup, rows: list, chosen: dict, rounds: int, seed: int) -> dict | None:
    """The side-by-side step times (:mod:`.llm_compare_timing`), kept as the cell ``step-times``."""
    from .llm_compare_timing import step_times

    if rounds < 1 or not chosen:
        return None
    store = setup.store
    record = store.load("step-times")
    timed = [(m, i) for m, i in rows if m != "zero-shot"]
    if record is not None and [(t["method"], t["implementation"]) for t in record["rows"]] != timed:
        record = None  # measured before rows were added (or with others): all rows again, side by side
    if record is None:
        print(f"[llm-compare] step times: {rounds} rounds, every trained row in turn", flush=True)
        record = store.save("step-times", {"settings": setup.settings, **step_times(setup, rows, chosen, rounds, seed)},
                            write=parallel.is_main())
    return record


def main(args: argparse.Namespace) -> int:
    from .llm_compare_report import write_outputs

    started = time.perf_counter()
    cfg, out = start_hf_run(args, LLMCompareConfig, "llm-compare")
    methods = parse_names(cfg.methods, METHODS, "methods")
    seeds = parse_seeds(cfg.seeds)
    if cfg.timing_rounds < 0:
        raise ValueError(f"--timing-rounds must be 0 (no timing) or more, got {cfg.timing_rounds}")
    grids = {m: parse_rates(cfg.lr[m], m) for m in methods if m != "zero-shot"}
    setup, data = prepare(cfg, out)
    chosen, sweep_table = sweep(setup, methods, grids, seeds[0])
    rows = [(m, i) for m, i in ROWS if m in methods]
    records = {}
    for seed in seeds:
        for method, implementation in rows:
            if method == "zero-shot" and seed != seeds[0]:
                continue  # greedy decoding of the base model: the same at every seed
            record = run_cell(setup, method, implementation, seed, chosen.get(method), test=True)
            records[(method, implementation, seed)] = record
            release_weights(setup, record)
    timing = measure_step_times(setup, rows, chosen, cfg.timing_rounds, seeds[0])
    write_outputs(out, asdict(cfg), setup.settings, data, seeds, chosen, sweep_table, records, timing,
                  notes=[f"The bottleneck adapter's AdapterHub row is missing: {ADAPTERHUB_REASON}"],
                  wall_seconds=time.perf_counter() - started)
    return 0
