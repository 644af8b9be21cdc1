"""Reading a compression table (rows of :mod:`.compress_cells`): summaries per method and rank, the markdown
table, the targets against dense, C-LoRA against SVD + fine-tune seed by seed, and the accuracy-vs-ratio figure."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Optional, Sequence

from matplotlib.figure import Figure

from .. import report
from .compress_cells import BASELINES, CLORA_VARIANTS
from .stats import format_mean_std, mean_std, paired_difference

FINETUNED = ("svd+finetune", "asvd+finetune")
TABLE_FILES = "results.json, report.md, accuracy_vs_ratio.png"  # what a table run writes in OUT
# Optional row fields summarised when every row of a group has them: field -> how seeds are combined.
EXTRA_FIELDS = {"model_ratio": statistics.fmean, "inference_ratio": statistics.median}


def method_name(row: dict) -> str:
    return row["variant"] if row["init"] is None else f"{row['variant']} ({row['init']})"


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std of accuracy (and mean ratios) per (method, rank), over the seeds present."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((method_name(row), row["variant"], row["init"], row["rank"]), []).append(row)
    summary = []
    for (method, variant, init, rank), group in groups.items():
        accuracy_mean, accuracy_std = mean_std([r["accuracy"] for r in group])
        entry = {"method": method, "variant": variant, "init": init, "rank": rank, "n": len(group),
                 "accuracy_mean": accuracy_mean, "accuracy_std": accuracy_std,
                 "compression_ratio": statistics.fmean(r["compression_ratio"] for r in group),
                 "file_ratio": statistics.fmean(r["file_ratio"] for r in group),
                 "train_seconds": statistics.fmean(r["train_seconds"] for r in group)}
        for name, combine in EXTRA_FIELDS.items():
            if all(r.get(name) is not None for r in group):
                entry[name] = combine(r[name] for r in group)
        summary.append(entry)
    return summary


def summary_table(summary: list[dict], reference_value: Optional[Callable[[dict], Optional[float]]] = None,
                  columns: Sequence[tuple[str, Callable[[dict], object]]] = ()) -> str:
    """One line per (rank, method), best first within a rank: ratio and file size in % of dense, accuracy mean ±
    std; ``columns`` add (header, value of a summary entry) after the file size, ``reference_value`` the reference
    project's number."""
    headers = ["rank", "method", "n", "ratio %", "file %", *[h for h, _ in columns], "accuracy %"]
    headers += ["seed's %"] if reference_value else []
    body = []
    for s in sorted(summary, key=lambda s: (s["rank"] or 0, -s["accuracy_mean"])):
        line = [s["rank"] or "—", s["method"], s["n"], round(100 * s["compression_ratio"], 2),
                round(100 * s["file_ratio"], 2), *[value(s) for _, value in columns],
                format_mean_std(s["accuracy_mean"], s["accuracy_std"])]
        body.append(line + ([reference_value(s)] if reference_value else []) + [round(s["train_seconds"], 1)])
    return report.markdown_table(headers + ["train s"], body)


def gap_targets(summary: list[dict], limits: Sequence[tuple[float, float]]) -> list[str]:
    """For each (ratio limit, allowed gap in pp): is the best C-LoRA method at that ratio or below within the
    gap of dense? One markdown bullet each."""
    dense = [s for s in summary if s["variant"] == "dense"]
    if not dense:
        return ["- no dense row: the targets against dense cannot be checked"]
    reference = dense[0]
    lines = []
    for limit, allowed in limits:
        fits = [s for s in summary if s["variant"] in CLORA_VARIANTS and s["compression_ratio"] <= limit]
        if not fits:
            lines.append(f"- C-LoRA at a ratio of {100 * limit:g} % or less: no such cell in this run")
            continue
        best = max(fits, key=lambda s: s["accuracy_mean"])
        gap = reference["accuracy_mean"] - best["accuracy_mean"]
        lines.append(f"- best C-LoRA at a ratio of {100 * limit:g} % or less: {best['method']}, rank {best['rank']} "
                     f"({100 * best['compression_ratio']:.1f} %), "
                     f"{format_mean_std(best['accuracy_mean'], best['accuracy_std'])} % against dense "
                     f"{format_mean_std(reference['accuracy_mean'], reference['accuracy_std'])} %: gap "
                     f"{gap:+.2f} pp (target <= {allowed:g} pp): **{'met' if gap <= allowed else 'not met'}**")
    return lines


def clora_vs_svd(rows: list[dict]) -> list[str]:
    """Per rank: the best C-LoRA method against the best SVD + fine-tune method (by mean accuracy), and their
    accuracy difference paired by seed (same dense model, same training steps) with its 95 % interval
    (:func:`~.stats.paired_difference`). One markdown bullet per rank."""
    lines = []
    for rank in sorted({r["rank"] for r in rows if r["rank"] is not None}):
        clora = _by_method([r for r in rows if r["rank"] == rank and r["variant"] in CLORA_VARIANTS])
        tuned = _by_method([r for r in rows if r["rank"] == rank and r["variant"] in FINETUNED])
        if not clora or not tuned:
            continue
        best_c = max(clora, key=lambda m: statistics.fmean(clora[m].values()))
        best_s = max(tuned, key=lambda m: statistics.fmean(tuned[m].values()))
        if not set(clora[best_c]) & set(tuned[best_s]):
            continue
        diff = paired_difference(clora[best_c], tuned[best_s])
        per_seed = ", ".join(f"{clora[best_c][s] - tuned[best_s][s]:+.2f}" for s in diff["seeds"])
        low, high = diff["ci95_low_pp"], diff["ci95_high_pp"]
        interval = "" if low is None else f" [{low:+.2f}, {high:+.2f}]"
        if low is None:
            verdict = "one seed only: no verdict"
        elif low > 0:
            verdict = "C-LoRA is better (the whole interval is above 0)"
        elif high < 0:
            verdict = "SVD + fine-tune is better (the whole interval is below 0)"
        else:
            verdict = f"not distinguishable at n = {diff['n']}"
        lines.append(f"- rank {rank}: {best_c} {_seeds_mean_std(clora[best_c])} vs {best_s} "
                     f"{_seeds_mean_std(tuned[best_s])}; C-LoRA minus SVD per seed {per_seed} pp, mean "
                     f"{diff['mean_pp']:+.2f}{interval} pp (95 % interval, n = {diff['n']}): **{verdict}**")
    return lines


def write_table(out: Path, head: dict, rows: list[dict], seconds: float, made_by: list, final: bool,
                render: Callable[[dict], str], **plot_options) -> dict:
    """results.json (``head`` -- experiment, model, config -- then made_by, wall time, rows, summary) and report.md;
    with ``final`` also accuracy_vs_ratio.png (``plot_options`` go to :func:`plot_accuracy_vs_ratio`, and may replace
    its y floor ``low`` -- dense - 15 -- and ``xticks`` -- one per rank)."""
    results = {**head, "made_by": made_by, "wall_seconds": round(seconds, 1), "rows": rows, "summary": summarize(rows)}
    report.write_results(out, results)
    report.write_report(out, render(results))
    if final:
        dense = [s["accuracy_mean"] for s in results["summary"] if s["variant"] == "dense"]
        low = max(0.0, (dense or [100])[0] - 15)
        options = {"low": low, "xticks": rank_ticks(results["summary"]), **plot_options}
        plot_accuracy_vs_ratio(out / "accuracy_vs_ratio.png", results["summary"], **options)
    return results


def result_sections(results: dict, limits: Sequence[tuple[float, float]], reference_note: str) -> list[str]:
    """The report of clora-conv and clora-transformer after their introduction: the table, the targets, C-LoRA
    against SVD + fine-tune, inference time per rank, the reference project's numbers (``reference_note``), merged runs, the figure."""
    summary, rows = results["summary"], results["rows"]
    columns = [("model %", lambda s: round(100 * s["model_ratio"], 2) if "model_ratio" in s else None),
               ("time ratio", lambda s: round(s["inference_ratio"], 3) if "inference_ratio" in s else None)]
    lines = [summary_table(summary, columns=columns), "", "## Targets", "", *gap_targets(summary, limits), "",
             "C-LoRA against SVD + fine-tune at equal rank, steps, learning rate and batch (the best method of each "
             "kind by mean accuracy; the choice of the best of several methods favours the side with more methods):",
             "", *(clora_vs_svd(rows) or ["- no rank has both a C-LoRA and an SVD + fine-tune row"]), ""]
    timed = sorted((s for s in summary if "inference_ratio" in s), key=lambda s: s["rank"])
    if timed:
        cfg = results["config"]
        lines += ["## Inference time", "",
                  f"Compressed / dense time of one forward pass on a batch of {cfg['timing_batch']} test inputs (eval, "
                  f"no grad, {cfg['threads']} thread(s)), timed dense, compressed, dense, ... for {cfg['timing_rounds']} "
                  "rounds; the median of each, then the median over seeds. Measured on the plain-SVD model of each rank, "
                  "which has the same low-rank layers as every compressed cell of that rank (C-LoRA wds lacks only C).",
                  "", report.markdown_table(["rank", "ratio %", "model %", "time compressed / dense", "seeds"],
                                            [[s["rank"], round(100 * s["compression_ratio"], 2),
                                              round(100 * s["model_ratio"], 2), round(s["inference_ratio"], 3), s["n"]]
                                             for s in timed]), ""]
    lines += ["## The seed's numbers", "", reference_note, "", *merged_runs(results["made_by"]),
              "![accuracy vs compression ratio](accuracy_vs_ratio.png)"]
    return lines


def merged_runs(made_by: list[dict], heading: str = "## Earlier runs whose rows this table holds",
                intro: str = "Processes of this run before a `--resume`, or runs joined with `--merge` (same protocol):"
                ) -> list[str]:
    """The report's section naming the runs whose rows this table took over (none: no lines)."""
    if not made_by:
        return []
    return [heading, "", intro, "",
            *[f"- `{m['command']}` -> {m['rows']} rows, {m['wall_seconds'] / 60:.1f} min" for m in made_by], ""]


def _by_method(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{method: {seed: accuracy}}."""
    table: dict[str, dict[int, float]] = {}
    for r in rows:
        table.setdefault(method_name(r), {})[r["seed"]] = r["accuracy"]
    return table


def _seeds_mean_std(by_seed: dict[int, float]) -> str:
    return f"{format_mean_std(*mean_std(list(by_seed.values())))} %"


def rank_ticks(summary: list[dict]) -> list[float]:
    """One x tick per rank: the mean ratio (%) of its methods, rounded to 0.1."""
    ranks = sorted({s["rank"] for s in summary if s["rank"] is not None})
    return [round(statistics.fmean(100 * s["compression_ratio"] for s in summary if s["rank"] == r), 1) for r in ranks]


def plot_accuracy_vs_ratio(path: Path, summary: list[dict], *, title: str, low: float, high: Optional[float] = None,
                           xticks: Sequence[float] = (), reference_points: Sequence[tuple[str, list, list, str]] = (),
                           reference_dense: Optional[float] = None,
                           xlabel: str = "compression ratio (% of the dense parameters)") -> None:
    """Accuracy vs ratio (log x), one line per method (solid: svd init, dashed: random init, dotted: SVD
    baselines), error bars = std over seeds; y from ``low`` (points below are named in the legend) to ``high``.
    ``reference_points``: (label, ratios %, accuracies, marker) drawn in black; ``reference_dense`` a black dotted line."""
    fig = Figure(figsize=(10, 5.5))
    ax = fig.add_subplot()
    colours = {v: f"C{i}" for i, v in enumerate([*CLORA_VARIANTS, *BASELINES])}
    for method in sorted({s["method"] for s in summary if s["variant"] != "dense"}):
        points = sorted((s for s in summary if s["method"] == method), key=lambda s: s["compression_ratio"])
        variant, init = points[0]["variant"], points[0]["init"]
        xs, ys = [100 * s["compression_ratio"] for s in points], [s["accuracy_mean"] for s in points]
        below = [f"{y:.1f} % at r={s['rank']}" for s, y in zip(points, ys) if y < low]
        style = "-" if init == "svd" else "--" if init == "random" else ":"
        ax.errorbar(xs, ys, yerr=[s["accuracy_std"] or 0.0 for s in points], color=colours[variant], linestyle=style,
                    marker="o", capsize=2, label=method + (f" (below: {', '.join(below)})" if below else ""))
    for label, xs, ys, marker in reference_points:
        ax.scatter(xs, ys, marker=marker, color="black", facecolors="none" if marker != "x" else None, s=50,
                   zorder=3, label=label)
    dense = [s for s in summary if s["variant"] == "dense"]
    if dense:
        ax.axhline(dense[0]["accuracy_mean"], color="grey", linestyle="-.",
                   label=f"dense, ours ({dense[0]['accuracy_mean']:.2f} %)")
    if reference_dense is not None:
        ax.axhline(reference_dense, color="black", linestyle=(0, (1, 3)), label=f"dense, seed ({reference_dense} %)")
    ax.set_ylim(low, high)
    ax.set_xscale("log")
    ax.minorticks_off()
    if xticks:
        ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    report.save_figure(fig, path)


def distill_note(cfg: dict) -> str:
    """The report's sentence on distillation (a leading space), or nothing when the cells learnt from labels alone."""
    weight = cfg.get("distill", 0.0)
    if not weight:
        return ""
    return (f" Every compressed cell (C-LoRA and SVD + fine-tune alike) also learns from the dense model of its seed: "
            f"loss = {1 - weight:g} x cross-entropy + {weight:g} x T² x KL(dense || compressed) at T = "
            f"{cfg['distill_temperature']:g}.")
