"""peft-compare's measurement harness: interleaved step time over all rows, and peak memory in a fresh process.

**Step time.** Every row is built once; then, in each round, every row runs ``steps`` training steps (forward,
backward, AdamW) on one fixed batch, in an order that rotates from round to round (A B C / B C A / ...), so
drift and load hit every row alike. A row's ratio in a round is its time per step over lorakit-LoRA's in the
same round; the report gives the median over rounds and the spread (quartiles, min and max). A row that lives
in another process (AdapterHub's, in its own environment) takes part through a callable that runs ``steps``
steps there and returns the seconds that process measured.

**Memory.** Each row in a fresh subprocess: a thread samples the resident set size (``/proc/self/statm``) every
millisecond during a few training steps; ``peak_memory_mb`` is the highest RSS, ``training_memory_mb`` its rise
over the RSS just before the first step (gradients, optimizer state, activations).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

import torch

from ..data.text import TextCollator
from .peft_compare_models import build

REFERENCE = ("lora", "lorakit")


def _training_steps(model, optimizer, batch, steps: int = 1) -> None:
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def spread(values: list[float]) -> dict:
    """Median, quartiles (inclusive method), min and max of ``values``."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def step_time_ratios(rows, settings, batch, rounds: int, steps: int, seed: int,
                     external: dict[tuple, Callable[[int], float]] | None = None) -> dict:
    """``{row: {step_time_ratio, step_time_ratio_q1/_q3/_min/_max, step_seconds_median, timing_rounds}}``; ``rows``
    are built in this process, ``external`` rows are callables ``run(steps) -> seconds``."""
    if REFERENCE not in rows:
        raise ValueError("the lorakit LoRA row is the step-time reference; keep 'lora' and 'lorakit'")
    runners: dict[tuple, Callable[[int], float]] = {}
    for method, implementation in rows:
        model, _ = build(method, implementation, settings, seed)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        _training_steps(model, optimizer, batch)  # warm-up: allocator, optimizer state

        def run(n: int, model=model, optimizer=optimizer) -> float:
            start = time.perf_counter()
            _training_steps(model, optimizer, batch, n)
            return time.perf_counter() - start

        runners[(method, implementation)] = run
    for key, run in (external or {}).items():
        run(1)  # warm-up in that process too
        runners[key] = run
    keys = list(runners)
    seconds: dict[tuple, list[float]] = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            seconds[key].append(runners[key](steps) / steps)
    reference = seconds[REFERENCE]
    out = {}
    for key, times in seconds.items():
        ratio = spread([t / ref for t, ref in zip(times, reference)])
        out[key] = {"step_time_ratio": ratio["median"], **{f"step_time_ratio_{k}": ratio[k] for k in ("q1", "q3", "min", "max")},
                    "step_seconds_median": statistics.median(times), "timing_rounds": rounds}
    return out


# -- peak memory, one fresh process per row ---------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sample_peak_rss(work: Callable[[], None]) -> dict:
    """Run ``work()`` while a thread samples RSS every millisecond: ``{peak_memory_mb, training_memory_mb}``."""
    gc.collect()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {"peak_memory_mb": peak[0] / 2**20, "training_memory_mb": (peak[0] - before) / 2**20}


def memory_probe(method: str, implementation: str, settings: dict, texts: list[str], labels: list[int],
                 steps: int, seed: int) -> dict:
    """In this (fresh) process: build the row, then sample RSS every millisecond during ``steps`` steps."""
    model, tokenizer = build(method, implementation, settings, seed)
    batch = TextCollator(tokenizer, settings["max_length"])(list(zip(texts, labels)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    return sample_peak_rss(lambda: _training_steps(model, optimizer, batch, steps))


def memory_probe_main() -> None:  # entry point of the subprocess
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job.pop("threads"))
    print(json.dumps(memory_probe(**job)))


def measure_memory(method, implementation, settings, texts, labels, steps, seed) -> dict:
    """:func:`memory_probe` in a fresh Python process (same threads as this one)."""
    job = json.dumps({"method": method, "implementation": implementation, "settings": settings, "texts": texts,
                      "labels": labels, "steps": steps, "seed": seed, "threads": torch.get_num_threads()})
    code = "from lorakit.experiments.peft_compare_measure import memory_probe_main; memory_probe_main()"
    done = subprocess.run([sys.executable, "-c", code, job], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {method}/{implementation} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
