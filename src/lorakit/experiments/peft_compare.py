"""``lorakit run peft-compare``: full fine-tuning, LoRA, bottleneck adapters and soft prompts (+ C-LoRA) on a
pretrained transformer, each written by lorakit and, where a library offers it, by that library (PEFT for LoRA
and prompt tuning, AdapterHub for the bottleneck adapter), side by side, from one command.

1. **Sweep.** For each method, every learning rate of its grid trains on the training split (seed = the first
   seed) and is scored on a validation split carved from the training data; the best validation accuracy picks
   the rate, which that method's rows (lorakit and library) then all use. The test set plays no part.
2. **Cells.** Every (method, implementation, seed) trains for the same steps, with the same threads, validating
   every epoch and keeping the best-validation weights; the test set is scored once, on those weights. Each cell
   is cached in ``<out>/cells/`` with its full record; ``--resume`` continues a stopped run.
3. **Evidence.** Per-step loss differences between lorakit and PEFT from the same start (``equivalence``),
   mean ± std per row, paired-by-seed differences with 95 % intervals (``differences``).
4. **Speed and memory** (:mod:`.peft_compare_measure`): interleaved step time over all rows; peak RSS per row in
   a fresh process.

Under ``torchrun ... --parallel ddp|fsdp`` every rank trains every cell on its slice of each batch (the same global
batch and order as one process); AdapterHub's rows and the measurements run once, on rank 0, which alone writes.

The pieces: :mod:`.text_task` (data, split, pretrained classifier), :mod:`.peft_compare_models` (models, same
start), :mod:`.peft_compare_cells` (one cell), :mod:`.peft_compare_adapterhub` (AdapterHub's row),
:mod:`.stats`, :mod:`.peft_compare_report`.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .. import count_parameters, parallel
from ..data.text import TextCollator
from ..report import package_version, run_metadata, write_report, write_results
from ..train import TrainConfig
from . import peft_compare_adapterhub as adapterhub
from .harness import add_config_flags, flag, parse_names, parse_rates, parse_seeds, start_hf_run
from .peft_compare_cells import CellContext, git_commit, run_cell
from .peft_compare_measure import measure_memory, step_time_ratios
from .peft_compare_models import IMPLEMENTATIONS, LIBRARY, ROWS, REFERENCE_004, REFERENCE_004_PARAMS, build
from .peft_compare_report import plot, report_markdown
from .stats import mean_std, paired_difference
from .text_task import load_data, split_validation

DESCRIPTION = ("full fine-tuning, LoRA, bottleneck adapters and soft prompts (+ C-LoRA) on a pretrained transformer, "
               "lorakit beside PEFT and AdapterHub: accuracy over seeds, equivalence, step time, memory")
METHODS = ("full", "lora", "adapter", "prompt", "clora")
SIZES = ("trainable_parameters", "total_parameters", "added_parameters", "checkpoint_bytes")  # a row's, at every seed


@dataclass
class PeftCompareConfig:
    """The flags of ``lorakit run peft-compare``, one field each. Lists stay comma-separated text, as typed: the
    run checks and parses them before any work (:func:`_plan`)."""

    model: str = flag("minilm", "'minilm' or a Hugging Face model folder (BERT-like)")
    dataset: str = flag("wordnet-supersense",
                        "'wordnet-supersense' or a .csv/.jsonl file with text,label columns (every 4th is test)")
    classes: Optional[str] = flag(None, "WordNet: comma-separated noun classes (default: six)")
    per_class_train: int = flag(200, "WordNet: training glosses per class (the validation split is carved from these)")
    per_class_val: int = flag(40, "validation examples per class, from training")
    per_class_test: int = flag(200, "WordNet: test glosses per class")
    methods: str = flag(",".join(METHODS), "comma-separated subset of " + ",".join(METHODS))
    implementations: str = flag("lorakit,peft,adapters",
                                "comma-separated subset of lorakit,peft,adapters (adapters = AdapterHub)")
    seeds: str = flag("0,1,2", "comma-separated training seeds (the first one sweeps)")
    epochs: float = flag(3.0, "passes over the training split, every row")
    batch_size: int = 16
    max_length: int = flag(48, "tokens per text (truncated)")
    schedule: str = flag("linear", choices=("constant", "linear", "cosine"))
    warmup_steps: int = 10
    rank: int = flag(8, "LoRA rank (alpha = 2 x rank), on query and value")
    clora_rank: int = flag(16, "C-LoRA rank on Q, K, V and O")
    bottleneck: int = flag(8, "adapter size, after each block's FFN output")
    num_tokens: int = flag(10, "soft prompt length")
    lr: dict[str, str] = flag({"full": "3e-5,1e-4,3e-4", "lora": "1e-3,3e-3,1e-2", "adapter": "1e-3,3e-3,1e-2",
                               "prompt": "1e-2,3e-2,1e-1", "clora": "1e-3,3e-3,1e-2"},
                              "{}: comma-separated learning rates to sweep (one value: no sweep)")
    """Each method's grid: ``--lr-full``, ``--lr-lora``, ... (results.json's config: ``lr``, by method)."""
    threads: int = flag(2, "torch threads for every row and measurement")
    own_init: bool = flag(False, "lorakit's LoRA/prompt rows use lorakit's own initialisation, not PEFT's")
    adapters_env: str = flag(".venv-adapters", "AdapterHub's virtual environment (made by `make adapters-env`)")
    timing_rounds: int = flag(15, "interleaved rounds of the step-time phase")
    timing_steps: int = flag(2, "training steps per row per round")
    memory_steps: int = flag(3, "training steps per row in the memory phase")
    skip_timing: bool = False
    skip_memory: bool = False
    state_every: int = flag(50, "steps between saved training states (resume)")
    resume: bool = flag(False, "reuse finished cells in --out, continue stopped ones")
    note: list[str] = flag([], "a line for the report's notes (repeatable)", action="append")
    parallel: str = flag("none", "under torchrun: 'ddp' or 'fsdp', every row trains with each process on its slice of "
                                 "every batch (fsdp: a sharded twin, gathered back after training); AdapterHub's rows, "
                                 "the timing and the memory phases run on rank 0 alone; rank 0 writes",
                         choices=["none", "ddp", "fsdp"])
    out: Optional[str] = flag(None, "output folder (default runs/peft-compare-<time>)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, PeftCompareConfig())


@dataclass
class _Plan:
    """What the command line asks for, checked before any work. ``rows`` loses, and ``missing`` names, a row that
    cannot run; ``notes`` (the report's) grows as the run goes."""

    methods: list[str]
    seeds: list[int]
    lrs: dict[str, list[float]]
    rows: list[tuple[str, str]]
    notes: list[str]
    missing: dict[tuple, str] = field(default_factory=dict)
    env: adapterhub.AdapterHubEnv | None = None
    """AdapterHub's environment, when its row was asked for."""


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    cfg, out = start_hf_run(args, PeftCompareConfig, "peft-compare")
    cells = out / "cells"
    plan = _plan(cfg, cells)
    train_data, test_data, label_names = load_data(cfg)
    train_data, val_data = split_validation(train_data, cfg.per_class_val)
    data = (train_data, val_data, test_data)
    settings, tokenizer = _settings(cfg, len(label_names), plan.seeds[0])
    context = CellContext(cells=cells, settings=settings, data=data,
                          train_config=functools.partial(_train_config, cfg), resume=cfg.resume,
                          state_every=cfg.state_every, run_config=asdict(cfg), same_start=not cfg.own_init,
                          parallel=cfg.parallel,
                          adapterhub=_AdapterHubCells(cfg, plan.env, settings, tokenizer, data, cells))
    sweep, chosen = _sweep(plan, context)
    records = _run_rows(plan, context, chosen)
    measured = parallel.on_main(lambda: measure(cfg, plan.rows, settings, tokenizer, train_data, cells, plan.env,
                                                plan.seeds[0]))
    results = _results(cfg, plan, context, records, measured, label_names, sweep, chosen, started)
    if parallel.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, results)
        plot(out, results["summary"])
        write_report(out, report_markdown(results))
        print(f"[peft-compare] wrote {out}", file=sys.stderr)
    parallel.barrier()
    return 0


def _plan(cfg: PeftCompareConfig, cells: Path) -> _Plan:
    if cells.is_dir() and any(cells.glob("*.json")) and not cfg.resume:
        raise ValueError(f"{cells.parent} already holds finished cells; pass --resume to continue that run, "
                         "or another --out")
    methods = parse_names(cfg.methods, METHODS, "methods")
    implementations = parse_names(cfg.implementations, IMPLEMENTATIONS, "implementations")
    seeds = parse_seeds(cfg.seeds)
    lrs = {m: parse_rates(cfg.lr[m], m) for m in methods}
    if "peft" in implementations and importlib.util.find_spec("peft") is None:
        raise ValueError("the PEFT rows need peft: pip install peft (or leave 'peft' out of --implementations)")
    rows = [(m, i) for m, i in ROWS if m in methods and i in implementations]
    if "lorakit" not in implementations:
        raise ValueError("every method needs its lorakit row (the sweep runs on it); keep 'lorakit'")
    plan = _Plan(methods, seeds, lrs, rows, notes=list(cfg.note))
    if ("adapter", "adapters") in rows:
        plan.env = adapterhub.find_env(cfg.adapters_env)
        if not plan.env.ready:
            plan.missing[("adapter", "adapters")] = plan.env.reason
            rows.remove(("adapter", "adapters"))
    return plan


def _settings(cfg: PeftCompareConfig, num_labels: int, seed: int) -> tuple[dict, object]:
    """The model settings every cell records (with the base model's parameter count), and the tokenizer."""
    settings = {"model": cfg.model, "num_labels": num_labels, "max_length": cfg.max_length,
                "rank": cfg.rank, "clora_rank": cfg.clora_rank, "bottleneck": cfg.bottleneck,
                "num_tokens": cfg.num_tokens}
    base, tokenizer = build("full", "lorakit", settings, seed)
    settings["base_parameters"] = count_parameters(base).total
    return settings, tokenizer


def _train_config(cfg: PeftCompareConfig, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(lr=lr, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=seed, optimizer="adamw",
                       schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, log_every=1, keep_best=True)


class _AdapterHubCells:
    """Runs AdapterHub's row of a cell (:attr:`CellContext.adapterhub`) in its own environment."""

    def __init__(self, cfg: PeftCompareConfig, env, settings: dict, tokenizer, data: tuple, cells: Path) -> None:
        self.cfg, self.env, self.settings, self.tokenizer = cfg, env, settings, tokenizer
        self.data, self.cells = data, cells
        self.ids: dict = {}  # the three splits' token ids, made at the first cell

    def __call__(self, seed: int, lr: float, train_config: TrainConfig, key: str) -> dict:
        if not self.ids:
            self.ids.update({name: adapterhub.token_ids(self.tokenizer, split, self.cfg.max_length)
                             for name, split in zip(("train", "validation", "test"), self.data)})
        head = adapterhub.save_initial_head(self.settings, seed, self.cells / f"{key}.head.safetensors")
        batches, eval_steps, factors = adapterhub.batch_plan(len(self.data[0]), train_config)
        job = {**adapterhub.common_job(self.settings, self.tokenizer, self.cfg.threads, seed, head), **self.ids,
               "lr": lr, "weight_decay": train_config.weight_decay, "batches": batches, "eval_steps": eval_steps,
               "lr_factors": factors, "eval_batch_size": 128}
        result = adapterhub.run_cell(self.env, job, self.cells, key)
        head.unlink()
        return {**result, "lr": lr, "final_loss": result["losses"][-1], "start": "own initialisation, lorakit's head",
                "adapterhub_versions": result.pop("versions")}


def _sweep(plan: _Plan, context: CellContext) -> tuple[list[dict], dict[str, float]]:
    sweep, chosen = [], {}
    for method in plan.methods:
        grid = plan.lrs[method]
        records = [run_cell(method, "lorakit", plan.seeds[0], lr, context=context, sweep=True) for lr in grid]
        usable = [r for r in records if r["best_val_accuracy"] is not None]
        if not usable:
            raise ValueError(f"every learning rate of {method}'s grid {grid} diverged; give --lr-{method} lower ones")
        # Best validation accuracy; ties go to the higher mean over all validations, then to the first in the grid.
        best = max(usable, key=lambda r: (r["best_val_accuracy"], sum(r["val_accuracies"]) / len(r["val_accuracies"])))
        chosen[method] = best["lr"]
        if len(records) > 1 and best["lr"] in (min(grid), max(grid)):
            plan.notes.append(f"The sweep chose {method}'s learning rate {best['lr']:g} at the edge of its grid "
                              f"{grid}; a wider grid might find a better one.")
        sweep += [{"method": method, "lr": r["lr"], "seed": plan.seeds[0], "best_val_accuracy": r["best_val_accuracy"],
                   "best_step": r["best_step"], "chosen": r is best, "diverged": r.get("diverged")} for r in records]
    return sweep, chosen


def _run_rows(plan: _Plan, context: CellContext, chosen: dict[str, float]) -> dict[tuple, dict]:
    """Every row at every seed with its method's chosen rate; an AdapterHub row that fails is dropped, with why."""
    records: dict[tuple, dict] = {}
    for seed in plan.seeds:
        for method, implementation in list(plan.rows):
            try:
                records[(method, implementation, seed)] = run_cell(method, implementation, seed, chosen[method],
                                                                   context=context)
            except RuntimeError as err:
                if implementation != "adapters":
                    raise
                plan.missing[(method, implementation)] = str(err)
                plan.rows.remove((method, implementation))
                records = {k: v for k, v in records.items() if k[:2] != (method, implementation)}
    return records


def _evidence(plan: _Plan, records: dict[tuple, dict], own_init: bool) -> dict:
    seeds, equivalence = plan.seeds, []
    for method in ("lora", "prompt"):
        pairs = [(records.get((method, "lorakit", s)), records.get((method, "peft", s))) for s in seeds]
        if all(a and b for a, b in pairs) and not own_init:
            per_seed = [max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) for a, b in pairs]
            equivalence.append({"method": method, "against": "peft", "steps": pairs[0][0]["steps"],
                                "max_abs_loss_diff": max(per_seed), "seeds": seeds, "per_seed": per_seed})
    accuracy = {row: {s: records[(*row, s)]["accuracy"] for s in seeds if (*row, s) in records} for row in plan.rows}
    differences = [{"method": m, "against": LIBRARY[m], **paired_difference(accuracy[(m, "lorakit")], accuracy[(m, LIBRARY[m])])}
                   for m in plan.methods if m in LIBRARY and (m, LIBRARY[m]) in accuracy]
    lora_vs_full = (paired_difference(accuracy[("lora", "lorakit")], accuracy[("full", "lorakit")])
                    if ("lora", "lorakit") in accuracy and ("full", "lorakit") in accuracy else None)
    return {"equivalence": equivalence, "differences": differences, "lora_vs_full": lora_vs_full}


def _summary(plan: _Plan, records: dict[tuple, dict], measured: dict[tuple, dict]) -> list[dict]:
    """One line per row: accuracy mean and std over its seeds, its parameters and measurements."""
    summary = []
    for row in plan.rows:
        mine = [records[(*row, s)] for s in plan.seeds if (*row, s) in records]
        mean, std = mean_std([r["accuracy"] for r in mine])
        summary.append({"method": row[0], "implementation": row[1], "n": len(mine), "seeds": [r["seed"] for r in mine],
                        "accuracy_mean": mean, "accuracy_std": std, "lr": mine[0]["lr"], "steps": mine[0]["steps"],
                        "best_val_accuracy_mean": mean_std([r["best_val_accuracy"] for r in mine])[0],
                        **{f: mine[0][f] for f in SIZES}, **measured[row]})
    return summary


def _results(cfg: PeftCompareConfig, plan: _Plan, context: CellContext, records: dict[tuple, dict],
             measured: dict[tuple, dict], label_names: list[str], sweep: list[dict], chosen: dict[str, float],
             started: float) -> dict:
    """results.json: the config, the data, the sweep and the chosen rates, the evidence, the summary, every row."""
    train_data, val_data, test_data = context.data
    evidence = _evidence(plan, records, cfg.own_init)
    row_fields = ("accuracy", *SIZES, "train_seconds", "steps", "final_loss", "lr", "best_val_accuracy", "best_step",
                  "per_class_accuracy", "threads", "git_commit", "start")
    result_rows = [{"method": m, "implementation": i, "seed": s, **{f: r.get(f) for f in row_fields},
                    "cell": f"cells/{r['key']}.json", **measured[(m, i)]} for (m, i, s), r in records.items()]
    summary = _summary(plan, records, measured)
    notes = plan.notes + [f"The {method}/{implementation} row is missing (no numbers were made up for it). Reason:\n\n"
                          + "\n".join(f"      {line}" for line in reason.splitlines())
                          for (method, implementation), reason in plan.missing.items()]
    if plan.env is not None and plan.env.ready:
        notes.append(f"AdapterHub's row ran in {cfg.adapters_env} ({', '.join(f'{k} {v}' for k, v in plan.env.versions.items())}): "
                     "SeqBnConfig (Pfeiffer) with reduction factor hidden/bottleneck, one adapter per block after the "
                     "feed-forward output; its placement and initialisation are AdapterHub's, not lorakit's, so the "
                     "comparison is by accuracy only (no loss equivalence).")
    settings, metadata = context.settings, run_metadata()
    return {
        "experiment": "peft-compare", "config": context.run_config, "settings": settings,
        "base_parameters": settings["base_parameters"], "classes": label_names, "seeds": plan.seeds,
        "train_size": len(train_data), "test_size": len(test_data),
        "steps": _train_config(cfg, 1.0, 0).total_steps(-(-len(train_data) // cfg.batch_size)),
        "threads": cfg.threads,
        "data": {"validation_size": len(val_data), "test_per_class": test_data.class_counts(),
                 "train_per_class": train_data.class_counts(), "validation_per_class": val_data.class_counts(),
                 "description": _data_description(cfg, train_data, val_data, test_data)},
        "sweep": sweep, "chosen_lr": chosen, **evidence, "summary": summary, "rows": result_rows,
        "missing_rows": [{"method": m, "implementation": i, "reason": r} for (m, i), r in plan.missing.items()],
        "seed_004": {"accuracy": REFERENCE_004, "added_parameters": REFERENCE_004_PARAMS}, "notes": notes,
        "wall_seconds": time.perf_counter() - started, "git_commit": git_commit(),
        "command": metadata["command"],
        "metadata": metadata | {"transformers": package_version("transformers"), "peft": package_version("peft")},
    }


def measure(cfg: PeftCompareConfig, rows, settings, tokenizer, train_data, cells, env, seed) -> dict[tuple, dict]:
    """Step-time ratios (interleaved) and peak memory (one process per row) of every row, on one batch."""
    examples = [train_data[i] for i in range(min(cfg.batch_size, len(train_data)))]
    texts, labels = zip(*examples)
    measured: dict[tuple, dict] = {row: {} for row in rows}
    hub_job = None  # AdapterHub's row, in its own environment: one job (this batch, lorakit's head), both phases
    if ("adapter", "adapters") in rows and not (cfg.skip_timing and cfg.skip_memory):
        head = adapterhub.save_initial_head(settings, seed, cells / "measure.head.safetensors")
        common = adapterhub.common_job(settings, tokenizer, cfg.threads, seed, head)
        hub_job = adapterhub.batch_job(common, tokenizer, texts, labels, cfg.max_length)
    try:
        if not cfg.skip_timing:
            print("[peft-compare] interleaved step-time phase", flush=True)
            batch = TextCollator(tokenizer, cfg.max_length)(examples)
            external = {("adapter", "adapters"): adapterhub.StepServer(env, hub_job, cells)} if hub_job else {}
            try:
                timing = step_time_ratios([r for r in rows if r[1] != "adapters"], settings, batch,
                                          cfg.timing_rounds, cfg.timing_steps, seed, external=external)
            finally:
                for server in external.values():
                    server.close()
            for row in rows:
                measured[row].update(timing[row])
        if not cfg.skip_memory:
            print("[peft-compare] peak-memory phase (one process per row)", flush=True)
            for row in rows:
                if row[1] == "adapters":
                    job = {**hub_job, "steps": cfg.memory_steps}
                    measured[row].update(adapterhub.measure_memory(env, job, cells))
                else:
                    measured[row].update(measure_memory(*row, settings, list(texts), list(labels), cfg.memory_steps,
                                                        seed))
    finally:  # finished or failed, the head file goes
        if hub_job is not None:
            head.unlink(missing_ok=True)
    return measured


def _data_description(cfg: PeftCompareConfig, train_data, val_data, test_data) -> str:
    if cfg.dataset == "wordnet-supersense":
        source = (f"WordNet 3.0 noun glosses (`\"<lemma>: <gloss>\"` -> supersense), split per class by "
                  f"`load_wordnet_supersense` (seeded shuffle per class; the first {cfg.per_class_test} of each class "
                  f"are test, the next {cfg.per_class_train} training)")
    else:
        source = f"{cfg.dataset} (every fourth example is test)"
    return (f"{source}; the first {cfg.per_class_val} training examples of each class form the validation split. "
            f"Per class: train {train_data.class_counts()}, validation {val_data.class_counts()}, "
            f"test {test_data.class_counts()} (stratified).")
