"""peft-compare's report: results.json -> report.md (tables, verdicts, the sweep) and accuracy_vs_params.png."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..report import markdown_table, save_figure
from .peft_compare_models import REFERENCE_004, REFERENCE_004_PARAMS
from .stats import at_least_verdict, format_mean_std, parity_verdict


def file_size(n: int | None) -> str | None:
    if n is None:
        return None
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def format_interval(d: dict) -> str:
    if d["ci95_low_pp"] is None:
        return f"{d['mean_pp']:+.2f} (no interval, n = {d['n']})"
    return f"{d['mean_pp']:+.2f} [{d['ci95_low_pp']:+.2f}, {d['ci95_high_pp']:+.2f}]"


def _reference_004_cell(method: str, implementation: str) -> str:
    ours, theirs, name = REFERENCE_004[method]
    if ours is None:
        return "—"
    return f"{ours}" if implementation == "lorakit" or theirs is None else f"{theirs} ({name})"


def _timing(s: dict) -> str | None:
    if s.get("step_time_ratio") is None:
        return None
    return f"{s['step_time_ratio']:.3f} [{s['step_time_ratio_q1']:.3f}, {s['step_time_ratio_q3']:.3f}]"


def main_table(results: dict) -> str:
    headers = ["method", "implementation", "test accuracy % (mean ± std)", "n", "best val. % (mean)", "lr",
               "trainable params", "added params", "checkpoint", "step time / lorakit-LoRA, median [IQR]",
               "peak RSS MB", "training memory MB", "seed 004 (T5-small, IMDB)"]
    table = []
    for s in results["summary"]:
        table.append([s["method"], s["implementation"], format_mean_std(s["accuracy_mean"], s["accuracy_std"]), s["n"],
                      s["best_val_accuracy_mean"], f"{s['lr']:g}", f"{s['trainable_parameters']:,}",
                      None if s.get("added_parameters") is None else f"{s['added_parameters']:,}",
                      file_size(s.get("checkpoint_bytes")), _timing(s), s.get("peak_memory_mb"),
                      s.get("training_memory_mb"), _reference_004_cell(s["method"], s["implementation"])])
    return markdown_table(headers, table, floatfmt=".2f")


def verdict_lines(results: dict) -> list[str]:
    """The issue's targets, each judged only as far as its measurement allows."""
    lines = []
    for e in results["equivalence"]:
        ok = e["max_abs_loss_diff"] <= 1e-4
        lines.append(f"- {e['method']}: largest per-step loss difference lorakit - {e['against']} over {e['steps']} "
                     f"steps x {len(e['seeds'])} seeds = {e['max_abs_loss_diff']:.2e} (target <= 1e-4): "
                     f"**{'met' if ok else 'missed'}**")
    for d in results["differences"]:
        nominal = d["ci95_low_pp"] is not None and d["ci95_low_pp"] <= 0 <= d["ci95_high_pp"] and abs(d["mean_pp"]) <= 0.5
        lines.append(f"- {d['method']}: accuracy lorakit - {d['against']} = {format_interval(d)} pp (95 % interval, paired "
                     f"by seed, n = {d['n']}). Target (0 inside the interval, |mean| <= 0.5 pp): "
                     f"**{'met' if nominal else 'missed'}**; what the interval allows: {parity_verdict(d, 0.5)}")
    gap = results.get("lora_vs_full")
    if gap:
        lines.append(f"- LoRA - full fine-tuning = {format_interval(gap)} pp (target: LoRA within 3 pp, i.e. >= -3): "
                     f"{at_least_verdict(gap, -3.0)}")
    by_row = {(s["method"], s["implementation"]): s for s in results["summary"]}
    peft_lora = by_row.get(("lora", "peft"))
    if peft_lora and peft_lora.get("step_time_ratio") is not None:
        ratio, worst = 1 / peft_lora["step_time_ratio"], 1 / peft_lora["step_time_ratio_min"]
        best = 1 / peft_lora["step_time_ratio_max"]
        lines.append(f"- lorakit-LoRA step time / PEFT-LoRA's = {ratio:.3f} (median of "
                     f"{peft_lora['timing_rounds']} interleaved rounds; range over rounds {best:.3f}-{worst:.3f}; "
                     f"target <= 1.0): **{'met' if ratio <= 1.0 else 'missed'}** on the median")
    return lines


def report_markdown(results: dict) -> str:
    c, data = results["config"], results["data"]
    lines = [
        "# peft-compare", "",
        f"{c['model']} ({results['base_parameters']:,} parameters) on {c['dataset']}: {results['train_size']} "
        f"training, {data['validation_size']} validation and {results['test_size']} test examples, "
        f"{len(results['classes'])} classes ({', '.join(results['classes'])}); seeds {results['seeds']}; "
        f"{results['steps']} steps of batch {c['batch_size']} for every row, max length {c['max_length']}, AdamW, "
        f"{c['schedule']} schedule after {c['warmup_steps']} warmup steps, {results['threads']} threads. "
        "The test set is scored once per cell, on the weights of the best validation accuracy.", "",
        main_table(results), "",
        "- *n*: seeds; a library row and a lorakit row with the same seed see the same head, data order and "
        "dropout masks; lorakit's LoRA and prompt rows also start from PEFT's initial adapter (see Equivalence).",
        "- *step time*: each row's time per training step over lorakit-LoRA's in the same round; median and "
        "quartiles over interleaved rounds with rotating order (one fixed batch; forward, backward, AdamW).",
        "- *peak RSS*: highest resident set size during a few training steps, each row in a fresh process; "
        "*training memory*: its rise over the RSS before the first step.",
        "- *seed 004*: T5-small on IMDB, 10 epochs (a different model and task, for the shape of the comparison).",
        "", "## Verdicts", "", *verdict_lines(results), "",
        "## Equivalence (same start, same data, same dropout masks)", "",
        markdown_table(["method", "against", "steps", "seeds", "max |loss difference| per step", "per seed"],
                       [[e["method"], e["against"], e["steps"], len(e["seeds"]), f"{e['max_abs_loss_diff']:.2e}",
                         ", ".join(f"{v:.1e}" for v in e["per_seed"])] for e in results["equivalence"]]), "",
        "## Learning-rate sweep (validation accuracy, seed " f"{results['seeds'][0]}; the test set plays no part)", "",
        markdown_table(["method", "lr", "best validation %", "at step", "chosen"],
                       [[s["method"], f"{s['lr']:g}", s["best_val_accuracy"], s["best_step"], "yes" if s["chosen"] else ("diverged" if s.get("diverged") else "")]
                        for s in results["sweep"]]), "",
        "## Data", "", data["description"], "",
        "Seed 004's parameter counts, reproduced exactly by `lorakit params` on T5-small's architecture: "
        + ", ".join(f"{k} {v:,}" for k, v in REFERENCE_004_PARAMS.items()) + ".", "",
        "## Notes", "", *[f"- {note}" for note in results["notes"]], "",
        f"Wall time {results['wall_seconds'] / 60:.1f} min; command: `{results['command']}`.", "",
        "![accuracy vs trainable parameters](accuracy_vs_params.png)", "",
    ]
    return "\n".join(lines)


def plot(out: Path, rows: list[dict]) -> None:
    """Accuracy vs trainable parameters (log): mean over seeds with ± std bars, one marker per implementation.

    A local helper rather than ``report.line_plot``: points need labels, and lorakit and library points that
    coincide must both stay visible (hollow circle vs cross).
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    styles = {"lorakit": dict(marker="o", markersize=9, markerfacecolor="none", color="tab:blue"),
              "peft": dict(marker="x", markersize=8, color="tab:orange"),
              "adapters": dict(marker="+", markersize=10, color="tab:green")}
    for implementation, style in styles.items():
        mine = [r for r in rows if r["implementation"] == implementation]
        if mine:
            ax.errorbar([r["trainable_parameters"] for r in mine], [r["accuracy_mean"] for r in mine],
                        yerr=[r["accuracy_std"] or 0.0 for r in mine], linestyle="none", capsize=3,
                        label=implementation, zorder=3, **style)
    for r in rows:
        if r["implementation"] == "lorakit":
            ax.annotate(r["method"], (r["trainable_parameters"], r["accuracy_mean"]), textcoords="offset points",
                        xytext=(7, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out / "accuracy_vs_params.png")
