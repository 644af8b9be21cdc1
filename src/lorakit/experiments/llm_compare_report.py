"""llm-compare's results: the cells -> results.json, report.md, accuracy_vs_params.png and loss_traces.png."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..report import line_plot, markdown_table, run_metadata, write_report, write_results
from .llm_compare_cells import CONTRASTS, LIBRARY
from .peft_compare_models import REFERENCE_004
from .peft_compare_report import file_size, format_interval, plot
from .stats import format_mean_std, mean_std, paired_difference

SEED_ORDER = ("adapter", "full", "lora", "prompt")  # seed 004: adapter >= full >= LoRA >= prompt


def summarise(records: dict, seeds: list[int], timing: dict | None) -> list[dict]:
    """One row per (method, implementation): accuracy over seeds, sizes, time (the side-by-side median as a ratio
    to lorakit-LoRA's), memory."""
    rows = {}
    for (method, implementation, seed), r in records.items():
        rows.setdefault((method, implementation), []).append(r)
    ratios = {(t["method"], t["implementation"]): t["ratio"] for t in (timing or {}).get("rows", [])}
    summary = []
    for (method, implementation), mine in rows.items():
        mean, std = mean_std([r["test"]["accuracy"] for r in mine])
        step = statistics.fmean(r["step_seconds"] for r in mine) if "step_seconds" in mine[0] else None
        summary.append({
            "method": method, "implementation": implementation, "n": len(mine), "seeds": [r["seed"] for r in mine],
            "accuracy_mean": mean, "accuracy_std": std, "lr": mine[0]["lr"],
            "trainable_parameters": mine[0].get("trainable_parameters", 0),
            "weights_bytes": mine[0].get("weights_bytes"), "step_seconds": step,
            "step_time_ratio": ratios.get((method, implementation)),
            "peak_memory_mb": max((r["peak_memory_mb"] for r in mine if "peak_memory_mb" in r), default=None),
            "training_memory_mb": max((r["training_memory_mb"] for r in mine if "training_memory_mb" in r),
                                      default=None),
            "eval_seconds_per_100": 100 * statistics.fmean(r["test"]["seconds"] / r["test"]["n"] for r in mine),
            "examples": mine[0]["test"]["examples"]})
    return summary


def equivalence(records: dict, seeds: list[int]) -> list[dict]:
    """Per method with a PEFT row: the largest per-step |loss difference| (and relative) from the same start."""
    found = []
    for method, library in LIBRARY.items():
        pairs = [(records.get((method, "lorakit", s)), records.get((method, library, s))) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a and b]
        if not pairs:
            continue
        absolute = [max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) for a, b in pairs]
        relative = [max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["losses"], b["losses"])) for a, b in pairs]
        found.append({"method": method, "against": library, "steps": len(pairs[0][0]["losses"]),
                      "seeds": [a["seed"] for a, _ in pairs], "max_abs_loss_diff": max(absolute),
                      "max_rel_loss_diff": max(relative), "per_seed": absolute})
    return found


def differences(records: dict, seeds: list[int]) -> list[dict]:
    accuracy = {}
    for (method, implementation, seed), r in records.items():
        accuracy.setdefault((method, implementation), {})[seed] = r["test"]["accuracy"]
    return [{"method": m, "against": lib, **paired_difference(accuracy[(m, "lorakit")], accuracy[(m, lib)])}
            for m, lib in LIBRARY.items() if (m, "lorakit") in accuracy and (m, lib) in accuracy]


def contrasts(records: dict) -> list[dict]:
    """Each variant's lorakit row minus its base method's lorakit row (DoRA - LoRA), paired by seed."""
    accuracy = {}
    for (method, implementation, seed), r in records.items():
        if implementation == "lorakit":
            accuracy.setdefault(method, {})[seed] = r["test"]["accuracy"]
    return [{"method": m, "against": base, **paired_difference(accuracy[m], accuracy[base])}
            for m, base in CONTRASTS if m in accuracy and base in accuracy]


def seed_ordering(summary: list[dict]) -> dict:
    """Does seed 004's ordering (adapter >= full >= LoRA >= prompt) hold for the lorakit rows' mean accuracies?"""
    means = {s["method"]: s["accuracy_mean"] for s in summary if s["implementation"] == "lorakit"}
    present = [m for m in SEED_ORDER if m in means]
    holds = all(means[a] >= means[b] for a, b in zip(present, present[1:]))
    ours = sorted(present, key=lambda m: -means[m])
    return {"methods": present, "holds": holds if len(present) > 1 else None, "our_order": ours}


def _row_cells(s: dict) -> list:
    seed_004 = REFERENCE_004.get(s["method"], (None, None, None))
    reference = seed_004[0] if s["implementation"] == "lorakit" else seed_004[1]
    ratio = s["step_time_ratio"]
    return [s["method"], s["implementation"], format_mean_std(s["accuracy_mean"], s["accuracy_std"]), s["n"],
            None if s["lr"] is None else f"{s['lr']:g}", s["trainable_parameters"], file_size(s["weights_bytes"]),
            None if ratio is None else f"{ratio:.3f}", s["peak_memory_mb"], reference]


def _timing_note(timing: dict | None) -> str:
    if timing is None:
        return "not measured (--timing-rounds 0)."
    return (f"the median of {timing['rounds']} training steps per row, the rows taking turns in one process on one "
            "batch (after a warm-up round), divided by lorakit-LoRA's median of the same rounds.")


def report_markdown(results: dict) -> str:
    st, order = results["settings"], results["seed_004_ordering"]
    table = markdown_table(["method", "implementation", "test accuracy % (mean ± std)", "n", "lr", "trainable params",
                            "adapter / model file", "step time / lorakit-LoRA", "peak RSS MB", "seed 004 (T5, IMDB)"],
                           [_row_cells(s) for s in results["summary"]])
    lines = ["# llm-compare", "",
             f"{st['model']} on WordNet supersenses by generation: {st['train_size']} training, "
             f"{st['validation_size']} validation, {st['test_size']} test examples ({len(st['classes'])} classes); "
             f"seeds {results['seeds']}; {st['steps']} steps of batch {st['batch_size']} for every trained row, "
             f"max length {st['max_length']}, AdamW at a constant rate chosen on validation. Scored by exact match of "
             "the greedy answer.", "", table, "",
             f"- *step time*: {_timing_note(results['step_times'])}",
             "- *peak RSS*: the process's highest resident set size while the cell trained (cells run one after "
             "another in one process, so it is an upper bound).", "",
             "## lorakit - PEFT, paired by seed (95 % interval, pp)", "",
             *[f"- {d['method']}: {format_interval(d)}" for d in results["differences"]], "",
             "## Variants against their base method (lorakit rows, paired by seed, 95 % interval, pp)", "",
             *[f"- {d['method']} - {d['against']}: {format_interval(d)}" for d in results["contrasts"]], "",
             "## Same start, same trajectory (per-step training loss)", "",
             markdown_table(["method", "against", "steps", "seeds", "max |diff|", "max relative diff"],
                            [[e["method"], e["against"], e["steps"], len(e["seeds"]), f"{e['max_abs_loss_diff']:.2e}",
                              f"{e['max_rel_loss_diff']:.2e}"] for e in results["equivalence"]]), "",
             "## Learning-rate sweep (validation, first seed; the test set plays no part)", "",
             markdown_table(["method", "lr", "validation %", "final loss", "chosen"],
                            [[s["method"], f"{s['lr']:g}", s["validation_accuracy"], s["final_loss"],
                              "yes" if s["chosen"] else ""] for s in results["sweep"]]), "",
             "## Seed 004's ordering", "",
             f"adapter >= full >= LoRA >= prompt over {order['methods']}: "
             f"**{ {True: 'holds', False: 'does not hold', None: 'not tested'}[order['holds']]}** "
             f"(ours, best first: {' > '.join(order['our_order'])}).", "",
             "## Example generations (first five test examples, first seed)", ""]
    for s in results["summary"]:
        lines += [f"**{s['method']} / {s['implementation']}**", ""]
        lines += [f"- `{e['answer']}` <- `{e['generated'].strip()[:60]}` ({'right' if e['correct'] else 'wrong'})"
                  for e in s["examples"]] + [""]
    lines += ["## Notes", "", *[f"- {n}" for n in results["notes"]], "",
              f"Wall time {results['wall_seconds'] / 60:.1f} min; command: `{results['command']}`.", "",
              "![accuracy vs trainable parameters](accuracy_vs_params.png)", "", "![loss traces](loss_traces.png)", ""]
    return "\n".join(lines)


def write_outputs(out: Path, config: dict, settings: dict, data: dict, seeds: list[int], chosen: dict,
                  sweep_table: list[dict], records: dict, timing: dict | None, notes: list[str],
                  wall_seconds: float) -> dict:
    summary = summarise(records, seeds, timing)
    results = {
        "experiment": "llm-compare", "config": config, "settings": settings, "data": data, "seeds": seeds,
        "test_size": settings["test_size"], "train_size": settings["train_size"], "classes": settings["classes"],
        "chosen_lr": chosen, "sweep": sweep_table, "summary": summary,
        "step_times": None if timing is None else {k: v for k, v in timing.items() if k != "settings"},
        "equivalence": equivalence(records, seeds), "differences": differences(records, seeds),
        "contrasts": contrasts(records),
        "seed_004": {"accuracy": REFERENCE_004}, "seed_004_ordering": seed_ordering(summary),
        "rows": [{k: v for k, v in r.items() if k != "settings"} for r in records.values()],
        "missing_rows": [{"method": "adapter", "implementation": "adapters", "reason": notes[0]}] if notes else [],
        "notes": notes, "wall_seconds": wall_seconds, "command": run_metadata()["command"], "metadata": run_metadata(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, results)
    plot(out, [s for s in summary if s["trainable_parameters"]])
    traces = {f"{m} {i}": (list(range(1, len(r["losses"]) + 1)), r["losses"])
              for (m, i, s), r in records.items() if s == seeds[0] and r.get("losses") and m in LIBRARY}
    line_plot(out / "loss_traces.png", traces, xlabel="step", ylabel="training loss per answer token",
              title=f"lorakit vs PEFT from the same start (seed {seeds[0]})")
    write_report(out, report_markdown(results))
    print(f"[llm-compare] wrote {out}", flush=True)
    return results
