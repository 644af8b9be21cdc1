"""Training-step time of lorakit's LoRA, adapter and soft prompt beside PEFT's LoRA and prompt tuning on MiniLM.

Each row is the model ``lorakit run peft-compare`` trains (same targets, ranks, heads). All rows are built
once, then timed in interleaved rounds whose order rotates; a row's number is the median over rounds of its
step time divided by lorakit-LoRA's in the same round (forward, backward, AdamW step on one fixed batch of
WordNet glosses). Writes its section of benchmarks/RESULTS.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peft_compare_step.py
"""
from __future__ import annotations

import os

import torch

from _common import machine, write_section
from lorakit.data.text import encode, load_wordnet_supersense
from lorakit.experiments.peft_compare import build, step_time_ratios

ROWS = [("lora", "lorakit"), ("lora", "peft"), ("adapter", "lorakit"), ("prompt", "lorakit"), ("prompt", "peft")]
SETTINGS = {"model": "minilm", "num_labels": 6, "max_length": 48, "rank": 8, "bottleneck": 8, "num_tokens": 10,
            "clora_rank": 16}
CASES = [(16, 10, 2), (64, 6, 1)]  # (batch size, rounds, steps per row per round)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, _, _ = load_wordnet_supersense(per_class_train=150, per_class_test=50)
    _, tokenizer = build("full", "lorakit", SETTINGS, 0)
    table = {}
    for batch_size, rounds, steps in CASES:
        texts, labels = zip(*[train[i] for i in range(batch_size)])
        batch = encode(tokenizer, texts, SETTINGS["max_length"])
        batch["labels"] = torch.tensor(labels)
        table[batch_size] = step_time_ratios(ROWS, SETTINGS, batch, rounds, steps, seed=0)
        print(batch_size, {f"{m}/{i}": round(v["step_time_ratio"], 3) for (m, i), v in table[batch_size].items()})
    header = "| row | " + " | ".join(f"batch {b}" for b, _, _ in CASES) + " |"
    lines = [header, "|---|" + "---:|" * len(CASES)]
    for key in ROWS:
        lines.append(f"| {key[0]} ({key[1]}) | " + " | ".join(f"{table[b][key]['step_time_ratio']:.3f}" for b, _, _ in CASES) + " |")
    peft_over_ours = " / ".join(f"{1 / table[b][('lora', 'peft')]['step_time_ratio']:.3f} at batch {b}" for b, _, _ in CASES)
    write_section("peft_compare", "\n".join([
        "## MiniLM training step, lorakit beside PEFT (`benchmarks/peft_compare_step.py`)",
        "",
        "Step time / lorakit-LoRA's in the same round (median over rotating interleaved rounds; forward, backward, "
        f"AdamW; max length 48, WordNet glosses). Machine: {machine()}.",
        "",
        *lines,
        "",
        f"Target: lorakit-LoRA / PEFT-LoRA <= 1.0; measured {peft_over_ours}.",
    ]))


if __name__ == "__main__":
    main()
