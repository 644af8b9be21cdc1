"""The seed's C-LoRA table on Fashion-MNIST (SEEDS.md B), with SVD baselines, over ranks and seeds.

Per seed: train the dense 784-256-128-10 ReLU MLP on the first 48,000 training images (the seed's 80/20 split),
then from that dense model, per rank, compress ``fc1`` and ``fc2`` with each method and measure test accuracy:

- C-LoRA variants ``wds`` (decay only), ``bias`` (+ C), ``noise`` (+ scheduled noise), ``noise+bias``, each with
  ``init`` random (the seed's) or svd; trained for ``epochs`` with the decay schedule, then ``lorakit.compress``;
- ``svd`` (truncated, no training), ``svd+finetune``, ``asvd+finetune`` (activation-aware, calibrated on
  ``calibration_size`` training images), fine-tuned for ``finetune_epochs``.

With ``train_head`` the uncompressed output layer ``fc3`` trains too (as in the seed's Keras model, where only W
was frozen). Compression ratio = (A + B + C of fc1 and fc2) / all parameters of the dense model.
Rows are written to results.json as they finish; ``--resume`` skips rows already there.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from matplotlib.figure import Figure
from torch import nn

import lorakit as lk
from . import config_from_args, output_dir
from .. import report
from .._io import load_tensors, save_tensors
from ..data.vision import load_fashion_mnist, to_float
from ..models import fmnist_mlp
from ..train import TrainConfig, evaluate, train

DESCRIPTION = "Reproduce and beat the seed's C-LoRA Fashion-MNIST table (C-LoRA variants, SVD baselines, dense)."

CLORA_VARIANTS = {"wds": ("none", False), "bias": ("none", True), "noise": ("scheduled", False),
                  "noise+bias": ("scheduled", True)}  # variant -> (noise mode, bias C)
BASELINES = ("svd", "svd+finetune", "asvd+finetune")
ALL_VARIANTS = ("dense", *CLORA_VARIANTS, *BASELINES)
TARGETS = ["fc1", "fc2"]
SEED_DENSE = 87.79
SEED_TABLE = {  # rank -> (ratio, {variant: accuracy %}), SEEDS.md B
    16: (0.099, {"wds": 82.10, "bias": 82.73, "noise": 81.59, "noise+bias": 83.74}),
    32: (0.195, {"wds": 83.20, "bias": 82.55, "noise": 83.44, "noise+bias": 83.93}),
    64: (0.389, {"wds": 82.87, "bias": 83.68, "noise": 82.38, "noise+bias": 84.23}),
}


@dataclass
class CLoRATableConfig:
    variants: list[str] = field(default_factory=lambda: list(ALL_VARIANTS))
    """Methods to run: dense, wds, bias, noise, noise+bias, svd, svd+finetune, asvd+finetune."""
    inits: list[str] = field(default_factory=lambda: ["random", "svd"])
    """C-LoRA initialisations of B A: 'random' (the seed's) and/or 'svd'."""
    ranks: list[int] = field(default_factory=lambda: [16, 32, 64])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: float = 30.0
    """C-LoRA training epochs (the seed: 30)."""
    dense_epochs: float = 30.0
    """Dense pre-training epochs (the seed: 30)."""
    finetune_epochs: float = 3.0
    """Epochs of fine-tuning for svd+finetune and asvd+finetune."""
    batch_size: int = 30
    lr: float = 1e-3
    alpha: float = 32.0
    decay_start: float = 0.05
    decay_end: float = 0.85
    noise: str = "scheduled"
    """Noise mode of the noise variants: 'scheduled' (the seed's, off once d < 0.3) or 'always'."""
    train_head: bool = True
    """Train the uncompressed fc3 alongside (the seed's Keras model did); False freezes it."""
    calibration_size: int = 2048
    """Training images used to calibrate asvd."""
    train_size: int = 48000
    """The first train_size training images train; the seed used 48,000 (80 %)."""
    threads: int = 1
    """torch threads; 1 avoids oversubscription on a shared machine and is faster for this small MLP."""
    data_dir: Optional[str] = None
    resume: bool = False
    """Skip (variant, init, rank, seed) rows already in OUT/results.json."""
    merge: list[str] = field(default_factory=list)
    """results.json files of other runs (e.g. seeds run in parallel processes) whose rows join this table."""
    report_only: bool = False
    """Train nothing: rewrite results.json, report.md and the figure from OUT's rows and the merged ones."""

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in ALL_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {', '.join(ALL_VARIANTS)}")
        bad = [i for i in self.inits if i not in ("random", "svd")]
        if bad:
            raise ValueError(f"unknown inits {bad}; choose from random, svd")
        if self.noise not in ("scheduled", "always"):
            raise ValueError(f"noise must be 'scheduled' or 'always', got {self.noise!r}")


def _list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CLoRATableConfig()
    parser.add_argument("--variants", type=_list(str), default=d.variants, help="comma-separated: " + ",".join(ALL_VARIANTS))
    parser.add_argument("--inits", type=_list(str), default=d.inits, help="comma-separated: random,svd")
    parser.add_argument("--ranks", type=_list(int), default=d.ranks, help="comma-separated ranks")
    parser.add_argument("--seeds", type=_list(int), default=d.seeds, help="comma-separated seeds")
    parser.add_argument("--epochs", type=float, default=d.epochs, help="C-LoRA training epochs")
    parser.add_argument("--dense-epochs", type=float, default=d.dense_epochs)
    parser.add_argument("--finetune-epochs", type=float, default=d.finetune_epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--alpha", type=float, default=d.alpha)
    parser.add_argument("--decay-start", type=float, default=d.decay_start)
    parser.add_argument("--decay-end", type=float, default=d.decay_end)
    parser.add_argument("--noise", choices=["scheduled", "always"], default=d.noise)
    parser.add_argument("--train-head", action=argparse.BooleanOptionalAction, default=d.train_head)
    parser.add_argument("--calibration-size", type=int, default=d.calibration_size)
    parser.add_argument("--train-size", type=int, default=d.train_size)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--merge", nargs="*", default=[], metavar="RESULTS_JSON")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", default=None, help="output folder (default: runs/clora-table-<time>)")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(CLoRATableConfig, args)
    out = output_dir(args.out, "clora-table")
    run(cfg, out)
    print(f"wrote {out}/results.json, report.md, accuracy_vs_ratio.png")
    return 0


# -- the pieces -----------------------------------------------------------------------------------
def load_data(cfg: CLoRATableConfig):
    """(train inputs, labels), (test inputs, labels); pixels / 255, flat (N, 784), as the seed."""
    images, labels = load_fashion_mnist(cfg.data_dir, "train")
    test_images, test_labels = load_fashion_mnist(cfg.data_dir, "test")
    train_x = to_float(images[: cfg.train_size]).flatten(1)
    return (train_x, labels[: cfg.train_size]), (to_float(test_images).flatten(1), test_labels)


def _train_cfg(cfg: CLoRATableConfig, epochs: float, seed: int) -> TrainConfig:
    return TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, epochs=epochs, seed=seed, log_every=100)


def dense_model(cfg: CLoRATableConfig, seed: int, data, out: Path) -> tuple[nn.Module, float]:
    """The seed's dense model trained with ``seed``; cached in OUT so a resumed run reuses it."""
    torch.manual_seed(seed)
    model = fmnist_mlp()
    path = out / "dense" / f"seed{seed}-epochs{cfg.dense_epochs:g}-batch{cfg.batch_size}.safetensors"
    if path.is_file():
        model.load_state_dict(load_tensors(path))
        return model, 0.0
    history = train(model, data, _train_cfg(cfg, cfg.dense_epochs, seed))
    save_tensors(path, model.state_dict())
    return model, history.seconds


def compressed_parameters(model: nn.Module) -> int:
    """A + B + C of the compressed layers."""
    return sum(p.numel() for name in TARGETS for p in model.get_submodule(name).parameters())


def file_size(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_tensors(path, model.state_dict())
        return path.stat().st_size


def run_clora(cfg: CLoRATableConfig, dense: nn.Module, variant: str, init: str, rank: int, seed: int, data):
    noise, bias = CLORA_VARIANTS[variant]
    noise = cfg.noise if noise != "none" else "none"
    model = copy.deepcopy(dense)
    torch.manual_seed(1000 * seed + rank)  # the random init of A
    clora = lk.CLoRAConfig(rank=rank, alpha=cfg.alpha, targets=TARGETS, decay_start=cfg.decay_start,
                           decay_end=cfg.decay_end, noise=noise, bias=bias, init=init,
                           modules_to_save=["fc3"] if cfg.train_head else None)
    lk.inject(model, clora)
    train_cfg = _train_cfg(cfg, cfg.epochs, seed)
    schedule = lk.DecaySchedule(model, train_cfg.total_steps(math.ceil(len(data[0]) / cfg.batch_size)))
    history = train(model, data, train_cfg, on_step=lambda step: schedule.step())
    return lk.compress(model), history.seconds


def run_svd(cfg: CLoRATableConfig, dense: nn.Module, variant: str, rank: int, seed: int, data):
    model = copy.deepcopy(dense)
    calibration = None
    if variant.startswith("asvd"):
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(data[0]), generator=generator)[: cfg.calibration_size]
        calibration = [(data[0][pick[i:i + 256]],) for i in range(0, len(pick), 256)]
    finetune = None
    seconds = [0.0]
    if variant.endswith("+finetune"):
        def finetune(m: nn.Module, params: list) -> None:
            head = list(m.fc3.parameters()) if cfg.train_head else []
            seconds[0] = train(m, data, _train_cfg(cfg, cfg.finetune_epochs, seed), params=params + head).seconds
    start = time.perf_counter()
    lk.svd_compress(model, rank=rank, targets=TARGETS, calibration=calibration, finetune=finetune)
    return model, (seconds[0] if finetune else time.perf_counter() - start)


# -- the experiment -------------------------------------------------------------------------------
def planned_rows(cfg: CLoRATableConfig) -> list[tuple[str, Optional[str], Optional[int], int]]:
    """(variant, init, rank, seed) in the order they run: per seed, dense first, then per rank."""
    rows = []
    for seed in cfg.seeds:
        if "dense" in cfg.variants:
            rows.append(("dense", None, None, seed))
        for rank in cfg.ranks:
            for variant in cfg.variants:
                if variant in BASELINES:
                    rows.append((variant, None, rank, seed))
                elif variant in CLORA_VARIANTS:
                    rows += [(variant, init, rank, seed) for init in cfg.inits]
    return rows


PROTOCOL = ("epochs", "dense_epochs", "finetune_epochs", "batch_size", "lr", "alpha", "decay_start", "decay_end",
            "noise", "train_head", "calibration_size", "train_size")


def _check_same_protocol(cfg: CLoRATableConfig, other: dict, path) -> None:
    """Rows from another run join this table only if they were made the same way."""
    differ = [f"{k}={other.get(k)!r} (here {getattr(cfg, k)!r})" for k in PROTOCOL if other.get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"{path} was made with a different protocol: {', '.join(differ)}; pass the same options")


def _key(row: dict) -> tuple:
    return row["variant"], row["init"], row["rank"], row["seed"]


def run(cfg: CLoRATableConfig, out: Path) -> dict:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    sources = [out / "results.json"] if (cfg.resume or cfg.report_only) and (out / "results.json").is_file() else []
    prior_seconds, made_by = 0.0, []
    for path in sources + [Path(p) for p in cfg.merge]:
        previous = json.loads(Path(path).read_text())
        _check_same_protocol(cfg, previous["config"], path)
        known = {_key(r) for r in rows}
        rows += [r for r in previous["rows"] if _key(r) not in known]
        prior_seconds += previous.get("wall_seconds", 0.0)
        made_by += previous.get("made_by") or [{"results": str(path), "rows": len(previous["rows"]),
                                                "command": previous.get("metadata", {}).get("command"),
                                                "wall_seconds": previous.get("wall_seconds")}]
    start = time.perf_counter() - prior_seconds  # wall time adds up over resumed and merged runs
    if cfg.report_only:
        merged = CLoRATableConfig(**{**asdict(cfg), "seeds": sorted({r["seed"] for r in rows}),
                                     "ranks": sorted({r["rank"] for r in rows if r["rank"] is not None})})
        return write(merged, out, rows, prior_seconds, made_by)
    done = {_key(r) for r in rows}
    data, test = load_data(cfg)
    dense_by_seed: dict[int, tuple[nn.Module, dict]] = {}
    for variant, init, rank, seed in planned_rows(cfg):
        if (variant, init, rank, seed) in done:
            continue
        if seed not in dense_by_seed:
            model, seconds = dense_model(cfg, seed, data, out)
            total = sum(p.numel() for p in model.parameters())
            dense_by_seed[seed] = (model, {"accuracy": evaluate(model, test).accuracy, "parameters": total,
                                           "seconds": seconds, "file_bytes": file_size(model)})
        dense, info = dense_by_seed[seed]
        if variant == "dense":
            row = {"variant": "dense", "init": None, "rank": None, "seed": seed, "accuracy": info["accuracy"],
                   "compression_ratio": 1.0, "parameters": info["parameters"], "train_seconds": info["seconds"],
                   "file_ratio": 1.0}
        else:
            if variant in CLORA_VARIANTS:
                model, seconds = run_clora(cfg, dense, variant, init, rank, seed, data)
            else:
                model, seconds = run_svd(cfg, dense, variant, rank, seed, data)
            row = {"variant": variant, "init": init, "rank": rank, "seed": seed,
                   "accuracy": evaluate(model, test).accuracy,
                   "compression_ratio": compressed_parameters(model) / info["parameters"],
                   "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": seconds,
                   "file_ratio": file_size(model) / info["file_bytes"]}
        rows.append(row)
        print(f"{variant:>14} {init or '':>6} rank {rank or '':>3} seed {seed}: {row['accuracy']:.2f} % "
              f"at {100 * row['compression_ratio']:.1f} % ({row['train_seconds']:.0f} s)", flush=True)
        write(cfg, out, rows, time.perf_counter() - start, made_by)
    return write(cfg, out, rows, time.perf_counter() - start, made_by)


def write(cfg: CLoRATableConfig, out: Path, rows: list[dict], seconds: float, made_by: list | None = None) -> dict:
    results = {"experiment": "clora-table", "model": "fmnist-mlp", "config": asdict(cfg), "made_by": made_by or [],
               "seed_numbers": {"dense": SEED_DENSE, "table": {str(r): {"ratio": v[0], **v[1]} for r, v in SEED_TABLE.items()}},
               "wall_seconds": round(seconds, 1), "rows": rows, "summary": summarize(rows)}
    report.write_results(out, results)
    report.write_report(out, render(results))
    plot(out / "accuracy_vs_ratio.png", results["summary"])
    return results


def _method(row: dict) -> str:
    return row["variant"] if row["init"] is None else f"{row['variant']} ({row['init']})"


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std of accuracy (and mean ratio) per (method, rank)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((_method(row), row["variant"], row["init"], row["rank"]), []).append(row)
    summary = []
    for (method, variant, init, rank), group in groups.items():
        accuracies = [r["accuracy"] for r in group]
        summary.append({"method": method, "variant": variant, "init": init, "rank": rank, "n": len(group),
                        "accuracy_mean": statistics.fmean(accuracies),
                        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                        "compression_ratio": statistics.fmean(r["compression_ratio"] for r in group),
                        "file_ratio": statistics.fmean(r["file_ratio"] for r in group),
                        "train_seconds": statistics.fmean(r["train_seconds"] for r in group)})
    return summary


def render(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    lines = ["# C-LoRA on Fashion-MNIST: the seed's table, reproduced and extended", "",
             f"Model 784-256-128-10 (ReLU), fc1 and fc2 compressed. Seeds {cfg['seeds']}; dense {cfg['dense_epochs']:g} "
             f"epochs, C-LoRA {cfg['epochs']:g} epochs, SVD fine-tune {cfg['finetune_epochs']:g} epochs; batch "
             f"{cfg['batch_size']}, Adam lr {cfg['lr']}, alpha {cfg['alpha']:g}, decay {cfg['decay_start']:.0%} -> "
             f"{cfg['decay_end']:.0%}, fc3 trained: {cfg['train_head']}. Accuracy on the 10,000 test images, mean ± std "
             f"over n seeds. Wall time {results['wall_seconds'] / 60:.1f} min (summed over the processes that made the rows).", "",
             "Ratio = (A + B + C of fc1, fc2) / 235,146; file = compressed safetensors size / dense size.", ""]
    seed_protocol = {"epochs": 30.0, "dense_epochs": 30.0, "batch_size": 30}
    changed = [f"{k} {cfg[k]:g} (seed: {v:g})" for k, v in seed_protocol.items() if cfg[k] != v]
    if changed:
        lines += [f"Shortened from the seed's protocol: {', '.join(changed)}. C-LoRA and the SVD baselines start "
                  "from the dense model of the same seed; the decay runs over the C-LoRA epochs.", ""]
    headers = ["rank", "method", "n", "ratio %", "file %", "accuracy %", "seed's %", "train s"]
    body = []
    for s in sorted(summary, key=lambda s: (s["rank"] or 0, -s["accuracy_mean"])):
        seed_value = SEED_DENSE if s["variant"] == "dense" else SEED_TABLE.get(s["rank"], (0, {}))[1].get(s["variant"])
        body.append([s["rank"] or "—", s["method"], s["n"], round(100 * s["compression_ratio"], 2),
                     round(100 * s["file_ratio"], 2), f"{s['accuracy_mean']:.2f} ± {s['accuracy_std']:.2f}",
                     seed_value, round(s["train_seconds"], 1)])
    lines += [report.markdown_table(headers, body), ""]
    best = {}
    for s in summary:
        if s["rank"] is not None and (s["rank"] not in best or s["accuracy_mean"] > best[s["rank"]]["accuracy_mean"]):
            best[s["rank"]] = s
    if best:
        lines += ["## Best method per rank against the seed's best", ""]
        rows = [[r, b["method"], f"{b['accuracy_mean']:.2f}", max(SEED_TABLE[r][1].values()) if r in SEED_TABLE else None]
                for r, b in sorted(best.items())]
        lines += [report.markdown_table(["rank", "best method", "accuracy %", "seed's best %"], rows), ""]
    if results["made_by"]:
        lines += ["## Runs merged into this table", "",
                  "Seeds and methods ran in separate processes (same protocol), then merged with `--report-only --merge`:",
                  ""]
        lines += [f"- `{m['command']}` -> {m['rows']} rows, {m['wall_seconds'] / 60:.1f} min" for m in results["made_by"]]
        lines += [""]
    return "\n".join(lines)


def plot(path: Path, summary: list[dict]) -> None:
    """Accuracy vs ratio, one line per method, the seed's points as black markers; a focused y range (points
    below it are noted in the legend). A local figure: ``report.line_plot`` has no line styles or y limits."""
    fig = Figure(figsize=(10, 5.5))
    ax = fig.add_subplot()
    low = 80.0
    methods = sorted({s["method"] for s in summary if s["variant"] != "dense"})
    colours = {v: f"C{i}" for i, v in enumerate([*CLORA_VARIANTS, *BASELINES])}
    for method in methods:
        points = sorted((s for s in summary if s["method"] == method), key=lambda s: s["compression_ratio"])
        variant, init = points[0]["variant"], points[0]["init"]
        xs, ys = [100 * s["compression_ratio"] for s in points], [s["accuracy_mean"] for s in points]
        below = [f"{y:.1f} % at r={s['rank']}" for s, y in zip(points, ys) if y < low]
        style = "-" if init == "svd" else "--" if init == "random" else ":"
        ax.errorbar(xs, ys, yerr=[s["accuracy_std"] for s in points], color=colours[variant], linestyle=style,
                    marker="o", capsize=2, label=method + (f" (below: {', '.join(below)})" if below else ""))
    markers = dict(zip(CLORA_VARIANTS, "xs^D"))
    for variant, marker in markers.items():
        ax.scatter([100 * SEED_TABLE[r][0] for r in SEED_TABLE], [SEED_TABLE[r][1][variant] for r in SEED_TABLE],
                   marker=marker, color="black", facecolors="none" if marker != "x" else None, s=50, zorder=3,
                   label=f"seed: {variant}")
    dense = [s for s in summary if s["variant"] == "dense"]
    if dense:
        ax.axhline(dense[0]["accuracy_mean"], color="grey", linestyle="-.", label=f"dense, ours ({dense[0]['accuracy_mean']:.2f} %)")
    ax.axhline(SEED_DENSE, color="black", linestyle=(0, (1, 3)), label=f"dense, seed ({SEED_DENSE} %)")
    ax.set_ylim(low, 90)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([10, 20, 40], ["10", "20", "40"])
    ax.set_xlabel("compression ratio (% of the dense parameters)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("Fashion-MNIST MLP: accuracy vs compression (solid: svd init, dashed: random init, dotted: SVD baselines)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    report.save_figure(fig, path)
