"""The one report writer: ``results.json`` (machine-readable), ``report.md`` (for people) and PNG figures.

Every file is written atomically. Figures use matplotlib's object API (``Figure``, no pyplot), which
renders with Agg and needs no display and no global state.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ._io import atomic_write, write_json, write_text


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_metadata() -> dict:
    """Versions, machine and time of this run (UTC, ISO 8601), for every results file."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lorakit": package_version("lorakit"),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),  # processes under torchrun
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from dataclasses, tensors, numpy values and paths; NaN and inf become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(out_dir: str | os.PathLike, results: dict) -> Path:
    """Write ``out_dir/results.json``; adds ``"metadata": run_metadata()`` unless ``results`` has one."""
    results = dict(results)
    results.setdefault("metadata", run_metadata())
    return write_json(Path(out_dir) / "results.json", to_jsonable(results))


def _cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else format(value, floatfmt)
    if value is None:
        return "—"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, floatfmt: str = ".2f") -> str:
    """A GitHub-flavoured Markdown table; floats use ``floatfmt``, numeric columns are right-aligned.

    >>> print(markdown_table(["rank", "acc"], [[16, 83.741]]))
    | rank | acc |
    |---:|---:|
    | 16 | 83.74 |
    """
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, the table has {len(headers)} columns")
    numeric = [bool(rows) and all(_is_number(row[i]) or row[i] is None for row in rows) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(_cell(h, floatfmt) for h in headers) + " |",
        "|" + "|".join("---:" if is_numeric else "---" for is_numeric in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_cell(value, floatfmt) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, markdown: str) -> Path:
    """Write ``out_dir/report.md``."""
    return write_text(Path(out_dir) / "report.md", markdown if markdown.endswith("\n") else markdown + "\n")


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Lay out ``fig`` and write it as a PNG atomically (the one place figures are saved)."""
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def bar_chart_wrong_counts(
    path: str | os.PathLike,
    before: Sequence[int],
    after: Sequence[int],
    *,
    labels: Sequence[str] | None = None,
    title: str = "Wrong predictions per class",
    names: tuple[str, str] = ("before", "after"),
) -> Path:
    """A grouped bar chart (PNG) of wrong counts per class, two bars per class."""
    if len(before) != len(after):
        raise ValueError(f"before has {len(before)} classes, after has {len(after)}")
    labels = list(labels) if labels is not None else [str(i) for i in range(len(before))]
    x = np.arange(len(before))
    width = 0.4
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    for offset, counts, name in ((-width / 2, before, names[0]), (width / 2, after, names[1])):
        bars = ax.bar(x + offset, counts, width, label=name)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_xlabel("class")
    ax.set_ylabel("wrong predictions")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def line_plot(
    path: str | os.PathLike,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    points: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    logx: bool = False,
) -> Path:
    """Lines with markers, one per ``series`` entry ``name: (xs, ys)``; ``points`` adds unconnected
    markers (e.g. a seed's published numbers) to compare against. Saved as PNG."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    for name, (xs, ys) in (points or {}).items():
        ax.scatter(xs, ys, marker="x", s=60, zorder=3, label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series or points:
        ax.legend()
    return save_figure(fig, path)
