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
import os
import time

from . import output_dir
from .. import parallel
from .llm_compare_cells import ROWS, Setup, release_weights, run_cell
from .llm_compare_task import stratified_subset, write_jsonl
from .harness import parse_names, parse_rates
from .text_task import load_data, split_validation

DESCRIPTION = ("seed 004 on a causal LM: zero-shot, LoRA, QLoRA, soft prompt, adapter and full fine-tuning of SmolLM2 "
               "on WordNet supersenses by generation, lorakit beside PEFT")
METHODS = ("zero-shot", "lora", "dora", "qlora", "prompt", "adapter", "full")
LR_GRIDS = {"lora": "3e-4,1e-3", "dora": "3e-4,1e-3", "qlora": "3e-4,1e-3", "prompt": "3e-2,1e-1",
            "adapter": "3e-4,1e-3", "full": "2e-5,5e-5"}
ADAPTERHUB_REASON = ("AdapterHub (`adapters`) pins transformers 4.57, so it runs only in its own environment "
                     "(`make adapters-env`), driven by peft-compare's bridge `scripts/adapterhub_row.py`, which trains "
                     "a sequence classifier; it has no causal-LM job (chat-template data, answer-only loss, greedy "
                     "generation, a 4-bit base), so this row is not run and no number is given for it.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local causal-LM folder")
    parser.add_argument("--classes", default=None, help="comma-separated WordNet noun classes (default: six)")
    parser.add_argument("--per-class-train", type=int, default=200, help="training glosses per class (as peft-compare)")
    parser.add_argument("--per-class-val", type=int, default=20, help="validation examples per class, from training")
    parser.add_argument("--per-class-test", type=int, default=200,
                        help="test glosses per class of the split (as peft-compare; --test-size scores a subset)")
    parser.add_argument("--test-size", type=int, default=1200, help="test examples scored, stratified per class")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (the first one sweeps)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps, every trained row")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step, every trained row")
    parser.add_argument("--max-length", type=int, default=192, help="tokens kept per example")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, on every linear layer but the head")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
    parser.add_argument("--num-tokens", type=int, default=10, help="soft prompt length")
    parser.add_argument("--bottleneck", type=int, default=16, help="adapter width, after each block's MLP")
    for method, grid in LR_GRIDS.items():
        parser.add_argument(f"--lr-{method}", default=grid, help=f"{method}: learning rates to sweep (one: no sweep)")
    parser.add_argument("--timing-rounds", type=int, default=5,
                        help="rounds of side-by-side training steps that time the rows (0: none)")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="prompts generated at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--save-every", type=int, default=20, help="steps between saved training states (resume)")
    parser.add_argument("--resume", action="store_true", help="reuse finished cells in --out, continue stopped ones")
    parser.add_argument("--out", default=None, help="output folder (default runs/llm-compare-<time>)")


def prepare(args, out) -> tuple[Setup, dict]:
    """The data (peft-compare's split), the training JSONL and the cells' shared settings."""
    args.dataset = "wordnet-supersense"
    train, test, label_names = load_data(args)
    train, validation = split_validation(train, args.per_class_val)
    test = stratified_subset(test, args.test_size)
    cells = out / "cells"
    if cells.is_dir() and any(cells.glob("*.json")) and not args.resume:
        raise ValueError(f"{out} already holds finished cells; pass --resume to continue that run, or another --out")
    settings = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                "rank": args.rank, "alpha": args.alpha, "num_tokens": args.num_tokens, "bottleneck": args.bottleneck,
                "save_every": args.save_every, "classes": label_names, "train_size": len(train),
                "validation_size": len(validation), "test_size": len(test)}
    setup = Setup(cells, write_jsonl(cells / "train.jsonl", train), validation, test, settings, args.resume,
                  args.eval_batch_size)
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
    import torch

    from .llm_compare_report import write_outputs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = output_dir(args.out, "llm-compare")
    methods = parse_names(args.methods, METHODS, "methods")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.timing_rounds < 0:
        raise ValueError(f"--timing-rounds must be 0 (no timing) or more, got {args.timing_rounds}")
    grids = {m: parse_rates(getattr(args, f"lr_{m.replace('-', '_')}"), m) for m in methods if m != "zero-shot"}
    setup, data = prepare(args, out)
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
    timing = measure_step_times(setup, rows, chosen, args.timing_rounds, seeds[0])
    config = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "experiment")}
    write_outputs(out, config, setup.settings, data, seeds, chosen, sweep_table, records, timing,
                  notes=[f"The bottleneck adapter's AdapterHub row is missing: {ADAPTERHUB_REASON}"],
                  wall_seconds=time.perf_counter() - started)
    return 0
