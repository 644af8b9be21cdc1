"""The reporting side of ``digit-stream``: the summary over seeds, the issue's targets, report.md and figures."""
from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .. import report
from .stats import format_mean_std, mean_std

SINGLE_MODEL_LORA = ("lora-merge", "lora-continual", "lora-preserve")  # one model, no stage id at test time
ORACLE = "adapters-per-stage"
# The targets, checked in this one place.
MIN_BACKWARD_TRANSFER_PP = -1.0
MAX_TRAINED_PERCENT = 1.0


def summarize(rows: list[dict]) -> list[dict]:
    """Per method, in the order first seen: means and stds over seeds, and the mean accuracy matrix."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = []
    for method in methods:
        group = [r for r in rows if r["method"] == method]
        matrices = np.array([r["accuracy_matrix"] for r in group])  # (seeds, T, T)
        average, average_std = mean_std([r["average_accuracy"] for r in group])
        bwt, bwt_std = mean_std([r["backward_transfer"] for r in group])
        trained = max(max(r["trained_parameters_per_stage"]) for r in group)
        base = group[0]["base_parameters"]
        names = [r["stages"] for r in group]
        summary.append({
            "method": method, "n": len(group), "seeds": [r["seed"] for r in group],
            "average_accuracy_mean": average, "average_accuracy_std": average_std,
            "backward_transfer_mean": bwt, "backward_transfer_std": bwt_std,
            "accuracy_matrix_mean": matrices.mean(0).tolist(),
            "accuracy_matrix_std": matrices.std(0, ddof=1).tolist() if len(group) > 1 else None,  # None: one seed
            "accuracy_before_mean": np.mean([r["accuracy_before"] for r in group], 0).tolist(),
            "seen_average_mean": np.mean([r["seen_average"] for r in group], 0).tolist(),
            "stages": names[0] if all(n == names[0] for n in names) else [f"stage {k}" for k in range(len(names[0]))],
            "base_parameters": base, "trained_parameters_per_stage": trained,
            "trained_percent": 100.0 * trained / base,
            "stored_parameters_per_stage": max(max(r["stored_parameters_per_stage"]) for r in group),
            "final_parameters": max(r["final_parameters"] for r in group),
            "final_model_plain": all(r["final_model_plain"] for r in group),
            "seconds_mean": statistics.fmean(r["seconds"]["total"] for r in group),
        })
    return summary


def check_targets(summary: list[dict]) -> dict:
    """The issue's targets: the best single-model LoRA method (by final average accuracy) against full."""
    by_method = {s["method"]: s for s in summary}
    candidates = [by_method[m] for m in SINGLE_MODEL_LORA if m in by_method]
    result: dict = {"min_backward_transfer_pp": MIN_BACKWARD_TRANSFER_PP, "max_trained_percent": MAX_TRAINED_PERCENT}
    if "lora-merge" in by_method:
        result["lora_merge_plain_original_size"] = by_method["lora-merge"]["final_model_plain"]
    if not candidates or "full" not in by_method:
        return result
    full = by_method["full"]

    def verdict(s: dict) -> dict:
        checks = {"average_at_least_full": s["average_accuracy_mean"] >= full["average_accuracy_mean"],
                  "backward_transfer_ok": s["backward_transfer_mean"] >= MIN_BACKWARD_TRANSFER_PP,
                  "trained_at_most_1_percent": s["trained_percent"] <= MAX_TRAINED_PERCENT}
        return {"method": s["method"], "average_accuracy": s["average_accuracy_mean"],
                "backward_transfer": s["backward_transfer_mean"], "trained_percent": s["trained_percent"],
                **checks, "met": all(checks.values())}

    best = max(candidates, key=lambda s: s["average_accuracy_mean"])
    result.update({"full_average_accuracy": full["average_accuracy_mean"],
                   "full_backward_transfer": full["backward_transfer_mean"], "best_lora": verdict(best)})
    if ORACLE in by_method:
        result["oracle"] = verdict(by_method[ORACLE])
    return result


def write_outputs(cfg, out: Path, rows: list[dict], pretrain_seconds: dict, wall_seconds: float, final: bool) -> dict:
    """results.json and report.md; with ``final`` also the figures (a heat map per method and the line plot)."""
    summary = summarize(rows)
    results = {"experiment": "digit-stream", "stream": cfg.stream, "model": cfg.model, "config": asdict(cfg),
               "complete": final, "rows": rows, "summary": summary, "targets": check_targets(summary),
               "pretrain_seconds": {str(k): v for k, v in sorted(pretrain_seconds.items())},
               "wall_seconds": round(wall_seconds, 1)}
    report.write_results(out, results)
    if final:
        low = min(min(min(row) for row in s["accuracy_matrix_mean"] + [s["accuracy_before_mean"]]) for s in summary)
        for s in summary:
            heat_map(out / f"heatmap_{s['method']}.png", s, vmin=min(90.0, 10 * (low // 10)))
        line_plot(out / "average_accuracy.png", summary)
    report.write_report(out, render(results, figures=final))
    return results


# -- tables ---------------------------------------------------------------------------------------------
def _summary_of(results: dict, method: str) -> dict:
    for s in results["summary"]:
        if s["method"] == method:
            return s
    raise KeyError(f"no method {method!r} in these results; they have: {[s['method'] for s in results['summary']]}")


def matrix_table(results: dict, method: str) -> str:
    """One method's accuracy matrix as a Markdown table: a row before any stage, then one per stage; a column
    per stage's test set and their average; cells are mean ± std over seeds (just the mean for one seed)."""
    s = _summary_of(results, method)
    mean = s["accuracy_matrix_mean"]
    std = s["accuracy_matrix_std"] if s["n"] > 1 else [[None] * len(row) for row in mean]  # one seed: the means

    before = s["accuracy_before_mean"]
    rows = [["before any stage", *[f"{v:.1f}" for v in before], f"{statistics.fmean(before):.1f}"]]
    for i, name in enumerate(s["stages"]):
        rows.append([f"after {name}", *[format_mean_std(m, d, 1) for m, d in zip(mean[i], std[i])], f"{statistics.fmean(mean[i]):.1f}"])
    return report.markdown_table([f"{method}: accuracy % on →", *s["stages"], "average"], rows)


def compare_table(results: dict, method: str, other: str = "full") -> str:
    """Two methods' mean accuracy matrices in one Markdown table, each cell 'method / other' (for the README)."""
    a, b = _summary_of(results, method), _summary_of(results, other)
    rows = [["before any stage", *[f"{v:.1f}" for v in a["accuracy_before_mean"]],
             f"{statistics.fmean(a['accuracy_before_mean']):.1f}"]]
    for i, name in enumerate(a["stages"]):
        ra, rb = a["accuracy_matrix_mean"][i], b["accuracy_matrix_mean"][i]
        rows.append([f"after {name}", *[f"{x:.1f} / {y:.1f}" for x, y in zip(ra, rb)],
                     f"{statistics.fmean(ra):.1f} / {statistics.fmean(rb):.1f}"])
    return report.markdown_table([f"{method} / {other}: accuracy % on →", *a["stages"], "average"], rows)


def all_digits_table(results: dict) -> str:
    """Digits stream: accuracy on the whole test set (all ten digits) before and after each stage, mean over seeds."""
    rows = [r for r in results["rows"] if "all_digits_accuracy" in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    body = []
    for method in methods:
        values = np.mean([r["all_digits_accuracy"] for r in rows if r["method"] == method], 0)
        body.append([method, *[f"{v:.1f}" for v in values]])
    stages = len(body[0]) - 2
    return report.markdown_table(["method", "before", *[f"after stage {k}" for k in range(stages)]], body)


def summary_table(results: dict) -> str:
    """One line per method: final average accuracy, BWT, parameters trained/stored per stage, time."""
    rows = []
    for s in results["summary"]:
        rows.append([s["method"], s["n"], format_mean_std(s["average_accuracy_mean"], s["average_accuracy_std"]),
                     format_mean_std(s["backward_transfer_mean"], s["backward_transfer_std"], signed=True),
                     f"{s['trained_parameters_per_stage']:,}", f"{s['trained_percent']:.3f}",
                     f"{s['stored_parameters_per_stage']:,}", f"{s['final_parameters']:,}",
                     "yes" if s["final_model_plain"] else "no", round(s["seconds_mean"], 1)])
    headers = ["method", "seeds", "final average accuracy %", "BWT pp", "trained / stage", "% of model",
               "stored / stage", "final model parameters", "plain model", "seconds / run"]
    return report.markdown_table(headers, rows)


def _targets_text(targets: dict) -> list[str]:
    lines = []
    if "best_lora" in targets:
        b = targets["best_lora"]
        lines.append(f"- Best single-model LoRA method: **{b['method']}**, final average {b['average_accuracy']:.2f} % "
                     f"vs full {targets['full_average_accuracy']:.2f} % ({'met' if b['average_at_least_full'] else 'NOT met'}); "
                     f"BWT {b['backward_transfer']:+.2f} pp, target >= {targets['min_backward_transfer_pp']:+.1f} "
                     f"({'met' if b['backward_transfer_ok'] else 'NOT met'}); trains {b['trained_percent']:.3f} % of the "
                     f"parameters per stage, target <= {targets['max_trained_percent']:g} % "
                     f"({'met' if b['trained_at_most_1_percent'] else 'NOT met'}).")
    if "oracle" in targets:
        o = targets["oracle"]
        lines.append(f"- {ORACLE} (needs the stage id at test time): final average {o['average_accuracy']:.2f} %, "
                     f"BWT {o['backward_transfer']:+.2f} pp.")
    if "lora_merge_plain_original_size" in targets:
        lines.append(f"- lora-merge's final model is a plain model of the original size (no lorakit module, same "
                     f"parameter count, so zero inference cost): {targets['lora_merge_plain_original_size']}.")
    return lines


def render(results: dict, figures: bool = True) -> str:
    cfg = results["config"]
    stream = (f"Rotated MNIST at {', '.join(f'{a:g}°' for a in cfg['angles'])}: each stage trains on its own disjoint "
              "random subset of the real training images, rotated, and is tested on the test images rotated the same way"
              if results["stream"] == "rotations" else
              f"{cfg['digit_stages']} digits, one per stage, worst first by the pre-trained model's test errors (per "
              "seed); a stage trains on that digit's training images and is tested on its test images")
    test = "all 10,000" if cfg["test_size"] is None else f"{cfg['test_size']:,} random (the same for every stage)"
    lines = [
        f"# digit-stream: {results['stream']} on {results['model']}", "",
        f"Stream: {stream}. Test images per stage: {test}. Seeds {sorted({r['seed'] for r in results['rows']})}, each with "
        f"its own pre-trained model (digit-finetune's, one epoch unless --pretrain-steps), stage subsets, LoRA init and "
        f"data order. Every method: {cfg['steps']} Adam steps per stage of {cfg['batch_size']} new images; LoRA rank "
        f"{cfg['rank']}, alpha {cfg['alpha']:g}, lr {cfg['lr']:g} on the model's Linear weights; full fine-tuning lr "
        f"{cfg['full_lr']:g}. lora-preserve adds {cfg['replay']:g} replayed image(s) per new image, drawn equally from "
        f"the pre-training set and each earlier stage's training set, with {cfg['kl_weight']:g} × KL(start-of-stage "
        "model ‖ adapted) on them, averaged over all the batch's images (digit-finetune's --preserve loss).", "",
        "R[i][j] = accuracy on stage j's test set after training on stage i. Final average accuracy = mean of the "
        "last row. Backward transfer (BWT) = mean over j < T of R[T][j] − R[j][j], in percentage points (negative = "
        "forgetting). 'Trained / stage': parameters with gradients in a stage; 'stored / stage': what each update "
        "adds to keep or ship (a LoRA's factors, or a whole model); 'final model parameters': what the model holds "
        "after the stream. Mean ± std over seeds.", "",
        summary_table(results), "", "## Targets", "", *_targets_text(results["targets"]), "",
    ]
    pre = ", ".join(f"seed {k}: {v:g} s" for k, v in results["pretrain_seconds"].items())
    lines += [f"Wall time {results['wall_seconds'] / 60:.1f} min in total (pre-training {pre or 'cached'}; "
              "0 s = reused from the cache).", ""]
    if not results["complete"]:
        lines += ["**Incomplete**: the run has not finished every cell yet (continue with --resume).", ""]
    if any("all_digits_accuracy" in r for r in results["rows"]):
        lines += ["## All ten digits", "",
                  "Each stage's test set holds one digit, so a model that answers that digit for every image scores "
                  "100 % on it (and adapters-per-stage, told the stage, is trivially perfect). What fixing a digit does "
                  "to the others shows on the whole test set (adapters-per-stage with its newest adapter):", "",
                  all_digits_table(results), ""]
    if figures:
        lines += ["## Average accuracy against stage", "",
                  "Left: over the stages seen so far (mean of R[i][0..i]); right: over all stages' test sets "
                  "(mean of R[i], the last point is the final average accuracy). Mean over seeds.", "",
                  "![average accuracy](average_accuracy.png)", ""]
    lines += ["## Accuracy matrices", ""]
    for s in results["summary"]:
        lines += [f"### {s['method']}", "", matrix_table(results, s["method"]), ""]
        if figures:
            lines += [f"![{s['method']}](heatmap_{s['method']}.png)", ""]
    return "\n".join(lines)


# -- figures --------------------------------------------------------------------------------------------
def heat_map(path: Path, s: dict, vmin: float) -> Path:
    """The mean accuracy matrix with the row before any stage on top, values written in the cells."""
    values = np.array([s["accuracy_before_mean"], *s["accuracy_matrix_mean"]])
    size = len(s["stages"])
    fig = Figure(figsize=(1.3 * size + 2.5, 0.7 * (size + 1) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=100.0, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < (vmin + 100) / 2 else "black")
    ax.set_xticks(range(size), s["stages"], rotation=30, ha="right")
    ax.set_yticks(range(size + 1), ["before", *[f"after {n}" for n in s["stages"]]])
    ax.set_xlabel("test set")
    ax.set_title(f"{s['method']}: accuracy % (mean of {s['n']} seed{'s' if s['n'] > 1 else ''})")
    fig.colorbar(image, ax=ax)
    return report.save_figure(fig, path)


def line_plot(path: Path, summary: list[dict]) -> Path:
    fig = Figure(figsize=(11, 4.5))
    seen, every = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for s in summary:
        size = len(s["stages"])
        seen.plot(range(1, size + 1), s["seen_average_mean"], marker="o", label=s["method"])
        rows = [s["accuracy_before_mean"], *s["accuracy_matrix_mean"]]
        every.plot(range(size + 1), [statistics.fmean(r) for r in rows], marker="o", label=s["method"])
    names = summary[0]["stages"]
    seen.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    every.set_xticks(range(len(names) + 1), ["before", *names], rotation=30, ha="right")
    seen.set_title("over the stages seen so far")
    every.set_title("over all stages' test sets")
    for ax in (seen, every):
        ax.set_xlabel("after stage")
        ax.set_ylabel("average accuracy %")
        ax.grid(alpha=0.3)
    every.legend(fontsize=8)
    return report.save_figure(fig, path)
