"""Shared by the benchmark scripts: their common flags, interleaved timing with medians, and writing one section of
RESULTS.md."""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def benchmark_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """``--repeats``, ``--threads`` (default 2) and ``--no-write`` (print only); a script adds its own flags, then
    :func:`parse` reads them and sets the threads."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the tables only (smoke runs)")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def interleaved(cases: dict[str, Callable[[], None]], repeats: int, inner: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each case, timed A B C A B C ... so drift hits every case alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d', time.gmtime())}")


def write_section(name: str, markdown: str) -> None:
    """Replace the text between ``<!-- name -->`` and ``<!-- /name -->`` in RESULTS.md (append if absent)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nRatios measured side by side in one process (medians); absolute times on shared machines are noise.\n"
    block = f"<!-- {name} -->\n{markdown.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)
