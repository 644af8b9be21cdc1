"""llm-compare's step times, measured side by side: every trained row's model is built in one process from its
first seed's start, then each takes one optimizer step in turn (A B C ... A B C ...), on the same batch, for a
few rounds after a warm-up round. A row's time is its median, reported as a ratio to lorakit-LoRA's median of the
same rounds, so that the machine's load falls on every row alike. (A cell's own ``step_seconds`` is its mean over
its training, which ran at another time than the other cells'.)"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from . import finetune
from .llm_compare_cells import Setup, finetune_config, lorakit_start, peft_start

BASELINE = ("lora", "lorakit")


def _step_function(model, batch: dict, lr: float):
    """One AdamW step of ``model`` on ``batch``, as the training loop takes it (zero grad, loss, backward, step)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        finetune.causal_lm_loss(model, batch).backward()
        optimizer.step()
    return step


def step_times(setup: Setup, rows: list[tuple[str, str]], chosen: dict, rounds: int, seed: int) -> dict:
    """``{"rounds", "rows": [{method, implementation, median_seconds, ratio}]}`` for every trained row of ``rows``,
    each from its ``seed``'s start."""
    from ..data.chat import SFTCollator, SFTDataset, read_jsonl

    examples = read_jsonl(setup.train_file)[:setup.settings["batch_size"]]
    steps = {}
    for method, implementation in [(m, i) for m, i in rows if m != "zero-shot"]:
        cfg = finetune_config(setup, method, seed, chosen[method], Path("unused"))
        model, tokenizer = (lorakit_start if implementation == "lorakit" else peft_start)(cfg)
        batch = SFTCollator(tokenizer.pad_token_id)([SFTDataset(examples, tokenizer, cfg.max_length)[i]
                                                     for i in range(len(examples))])
        steps[(method, implementation)] = _step_function(model, batch, chosen[method])
    seconds = {row: [] for row in steps}
    for round_ in range(rounds + 1):  # round 0 warms up (allocations, kernels) and is not counted
        for row, step in steps.items():
            started = time.perf_counter()
            step()
            if round_:
                seconds[row].append(time.perf_counter() - started)
    medians = {row: statistics.median(s) for row, s in seconds.items()}
    baseline = medians.get(BASELINE)
    return {"rounds": rounds, "rows": [{"method": m, "implementation": i, "median_seconds": medians[(m, i)],
                                        "ratio": medians[(m, i)] / baseline if baseline else None}
                                       for m, i in steps]}
