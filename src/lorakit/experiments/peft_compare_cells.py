"""One cell of peft-compare: a (method, implementation, seed, learning rate) trained, validated and tested once.

Each finished cell is a :class:`~.harness.CellStore` record, ``<out>/cells/<key>.json``: settings, training config,
learning rate, steps, the loss of every step, the validation curve, test accuracy, threads, git commit. With
``--resume`` a cell stopped mid-way continues from its training state (``<key>.state``, written every
``state_every`` steps and removed when the cell ends).
"""
from __future__ import annotations

import dataclasses
import functools
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import count_parameters, parallel
from ..data.text import TextCollator
from ..train import TrainConfig, TrainingDivergedError, evaluate, train
from ..train_state import discard_state
from .harness import CellStore, clora_decay_hooks
from .peft_compare_models import build, checkpoint_bytes
from .text_task import Examples


def cell_key(method: str, implementation: str, seed: int, lr: float) -> str:
    return f"{method}-{implementation}-seed{seed}-lr{lr:g}"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the source tree this code runs from, or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def run_row(method, implementation, settings, train_data, test_data, train_cfg, seed, *,
            validation=None, same_start: bool = False, parallel_mode: str = "none") -> dict:
    """Train one lorakit or PEFT row with ``lorakit.train`` and score ``test_data`` once, on the kept weights.

    With ``validation`` the loop validates every epoch and keeps the best-validation weights (``train_cfg``).
    ``parallel_mode`` 'ddp' or 'fsdp' (under torchrun): the training loop sees the model wrapped or a sharded twin
    (:func:`lorakit.parallel.training_copy`); scoring and saving see the plain model.
    """
    model, tokenizer = build(method, implementation, settings, seed, same_start=same_start)
    collator = TextCollator(tokenizer, settings["max_length"])
    steps = train_cfg.total_steps(-(-len(train_data) // train_cfg.batch_size))
    with parallel.training_copy(model, parallel_mode) as trained:
        hooks = clora_decay_hooks(trained, steps) if method == "clora" else {}
        history = train(trained, Examples(train_data), train_cfg, collate_fn=collator, **hooks,
                        validation=None if validation is None else Examples(validation),
                        num_classes=settings["num_labels"])
    result = evaluate(model, Examples(test_data), settings["num_labels"], batch_size=128, collate_fn=collator)
    counts = count_parameters(model)
    if implementation == "lorakit":
        added = counts.adapter
    else:
        added = counts.total - settings["base_parameters"] if "base_parameters" in settings else None
    return {"method": method, "implementation": implementation, "seed": seed, "accuracy": result.accuracy,
            "trainable_parameters": counts.trainable, "total_parameters": counts.total, "added_parameters": added,
            "checkpoint_bytes": checkpoint_bytes(model, method, implementation),
            "train_seconds": history.seconds, "steps": history.steps, "final_loss": history.losses[-1],
            "lr": train_cfg.lr, "per_class_accuracy": result.to_dict()["per_class_accuracy"],
            "wrong_per_class": result.wrong_per_class, "total_per_class": result.total_per_class,
            "losses": history.losses, "val_steps": history.val_steps, "val_accuracies": history.val_accuracies,
            "best_step": history.best_step, "best_val_accuracy": history.best_val_accuracy}


@dataclass
class CellContext:
    """What every cell of one peft-compare run shares."""

    cells: Path
    """The cells folder: one JSON record per finished cell, and the training states of unfinished ones."""
    settings: dict
    """The model settings, recorded in every cell (a resumed run must have the same)."""
    data: tuple
    """(train, validation, test) data sets."""
    train_config: Callable[[float, int], TrainConfig]
    """(lr, seed) -> the cell's TrainConfig."""
    resume: bool
    """Read back the cells an earlier run finished, continue its stopped one."""
    state_every: int
    """Steps between saved training states."""
    run_config: dict
    """The command's options, recorded in every cell."""
    same_start: bool
    """lorakit's LoRA and prompt rows start from PEFT's initial weights."""
    adapterhub: Callable[[int, float, TrainConfig, str], dict] | None = None
    """(seed, lr, cfg, key) -> AdapterHub's row of a cell, run in its own environment."""
    parallel: str = "none"
    """One of "none", "ddp", "fsdp" (under torchrun)."""
    done: dict[str, dict] = field(default_factory=dict)
    """Cells finished in this run, by key (the sweep's seed is also a row's seed)."""


def run_cell(method: str, implementation: str, seed: int, lr: float, *, context: CellContext,
             sweep: bool = False) -> dict:
    """Train (or, if this run or, with ``context.resume``, an earlier one finished it, read back) one cell.

    ``sweep=True``: a learning rate that diverges is recorded as such (``diverged``, no accuracies), so the
    sweep can pass over it; outside the sweep a divergence stops the run with its error."""
    folder: Path = context.cells
    key = cell_key(method, implementation, seed, lr)
    cfg = context.train_config(lr, seed)
    expected = {"settings": context.settings, "train_config": _asdict(cfg)}
    store = CellStore(folder, expected, context.resume)
    done = context.done
    record = done.get(key) or store.load(key)
    if record is not None:
        done[key] = record
        return record
    folder.mkdir(parents=True, exist_ok=True)
    train_data, validation, test = context.data
    say = print if parallel.is_main() else (lambda *a, **k: None)
    say(f"[peft-compare] {key}", flush=True)
    if implementation == "adapters":  # one subprocess, on rank 0 under torchrun
        row = parallel.on_main(lambda: context.adapterhub(seed, lr, cfg, key))
    else:
        state = folder / f"{key}.state"
        cfg.state_path, cfg.resume, cfg.checkpoint_every = str(state), context.resume, context.state_every
        same_start = implementation == "lorakit" and method in ("lora", "prompt") and context.same_start
        try:
            row = run_row(method, implementation, context.settings, train_data, test, cfg, seed,
                          validation=validation, same_start=same_start, parallel_mode=context.parallel)
        except TrainingDivergedError as err:
            if not sweep:
                raise
            row = {"diverged": str(err), "steps": err.step, "accuracy": None, "best_val_accuracy": None,
                   "best_step": None, "val_accuracies": [], "losses": [], "train_seconds": None}
        row["start"] = "PEFT's initial weights" if same_start else "own initialisation"
        if parallel.is_main():
            discard_state(state)
    record = {"key": key, **row, "method": method, "implementation": implementation, "seed": seed, "lr": lr,
              **expected, "run_config": context.run_config, "threads": torch.get_num_threads(),
              "git_commit": git_commit()}
    done[key] = store.save(key, record, write=parallel.is_main())
    say(f"[peft-compare]   {record.get('diverged') or 'test %.2f %%' % record['accuracy']}, best validation "
          f"{record['best_val_accuracy']} at step {record['best_step']}", flush=True)
    return done[key]


def _asdict(cfg) -> dict:
    free = {"state_path", "resume", "checkpoint_every", "progress", "checkpoint"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}
