"""Training-step time of every peft-compare row on MiniLM, interleaved, against lorakit's LoRA.

Each row is the model ``lorakit run peft-compare`` trains (same targets, ranks, heads): full fine-tuning, LoRA,
bottleneck adapter, soft prompt and C-LoRA from lorakit; LoRA and prompt tuning from PEFT; AdapterHub's bottleneck
adapter in its own environment (``make adapters-env``; left out, saying why, when it is missing). All rows are
built once, then timed in interleaved rounds whose order rotates; a row's number is the median over rounds of its
step time over lorakit-LoRA's in the same round, with the quartiles and the range (forward, backward, AdamW on
one fixed batch of WordNet glosses, fixed threads). Writes its section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/peft_compare_step.py --threads 2 --rounds 15
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from _common import machine, write_section
from lorakit.data.text import encode, load_wordnet_supersense
from lorakit.experiments import peft_compare_adapterhub as adapterhub
from lorakit.experiments.peft_compare_measure import step_time_ratios
from lorakit.experiments.peft_compare_models import build

ROWS = [("full", "lorakit"), ("lora", "lorakit"), ("lora", "peft"), ("adapter", "lorakit"), ("prompt", "lorakit"),
        ("prompt", "peft"), ("clora", "lorakit")]
SETTINGS = {"model": "minilm", "num_labels": 6, "max_length": 48, "rank": 8, "bottleneck": 8, "num_tokens": 10,
            "clora_rank": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (the median is over these)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per row per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--adapters-env", default=str(Path(__file__).resolve().parents[1] / ".venv-adapters"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    train, _, _ = load_wordnet_supersense(per_class_train=200, per_class_test=200)
    _, tokenizer = build("full", "lorakit", SETTINGS, 0)
    texts, labels = zip(*[train[i] for i in range(args.batch_size)])
    batch = encode(tokenizer, texts, SETTINGS["max_length"])
    batch["labels"] = torch.tensor(labels)
    env = adapterhub.find_env(args.adapters_env)
    with tempfile.TemporaryDirectory() as folder:
        external, server = {}, None
        if env.ready:
            head = adapterhub.save_initial_head(SETTINGS, 0, Path(folder) / "head.safetensors")
            common = adapterhub.common_job(SETTINGS, tokenizer, args.threads, 0, head)
            server = adapterhub.StepServer(env, adapterhub.batch_job(common, tokenizer, texts, labels, 48), Path(folder))
            external[("adapter", "adapters")] = server
        try:
            table = step_time_ratios(ROWS, SETTINGS, batch, args.rounds, args.steps, seed=0, external=external)
        finally:
            if server is not None:
                server.close()
    lines = ["| row | step time / lorakit-LoRA (median) | quartiles | range over rounds | s/step (median) |",
             "|---|---:|---|---|---:|"]
    for (method, implementation), t in table.items():
        lines.append(f"| {method} ({implementation}) | {t['step_time_ratio']:.3f} | {t['step_time_ratio_q1']:.3f}-"
                     f"{t['step_time_ratio_q3']:.3f} | {t['step_time_ratio_min']:.3f}-{t['step_time_ratio_max']:.3f} | "
                     f"{t['step_seconds_median']:.3f} |")
        print(lines[-1])
    peft = table[("lora", "peft")]
    missing = [] if env.ready else [f"AdapterHub's row is missing: {env.reason.splitlines()[0]}"]
    write_section("peft_compare", "\n".join([
        "## MiniLM training step, every peft-compare row (`benchmarks/peft_compare_step.py`)",
        "",
        f"Step time / lorakit-LoRA's in the same round: median over {args.rounds} rotating interleaved rounds of "
        f"{args.steps} steps, quartiles and range; forward, backward, AdamW; batch {args.batch_size}, max length 48, "
        f"WordNet glosses; {args.threads} threads. Machine: {machine()}.",
        "",
        *lines,
        "",
        f"lorakit-LoRA / PEFT-LoRA = {1 / peft['step_time_ratio']:.3f} (median; over rounds "
        f"{1 / peft['step_time_ratio_max']:.3f}-{1 / peft['step_time_ratio_min']:.3f}); target <= 1.0.",
        *missing,
    ]))


if __name__ == "__main__":
    main()
