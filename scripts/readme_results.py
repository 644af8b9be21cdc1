"""Rewrite the results section of README.md from the committed reference runs under results/.

Run: .venv/bin/python scripts/readme_results.py   (numbers are never typed into the README by hand)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from lorakit.experiments.digit_finetune import digit_table

ROOT = Path(__file__).resolve().parents[1]


def digit_finetune() -> list[str]:
    lines = ["## Results: fix the worst digit (`results/digit-finetune/`)", "",
             "Real MNIST, the seeds' own hyper-parameters (SEEDS.md A); 'seed' columns are the seeds' published "
             "numbers. Our pre-trained model is a different draw, so its worst digit differs.", ""]
    for run in sorted((ROOT / "results" / "digit-finetune").glob("*/results.json")):
        r = json.loads(run.read_text())
        p = r["parameters"]
        kind = "--preserve" if r["preserve"] else "faithful"
        before, after = r["before"]["wrong_per_class"], r["after"]["wrong_per_class"]
        d = r["target_digit"]
        lines += [f"### {r['model']}, {kind}, mode={r['mode']} (`{run.parent.relative_to(ROOT)}`)", "",
                  f"+{p['adapter']:,} parameters ({p['increment_percent']:.3f} %); target digit {d}: "
                  f"{before[d]} -> {after[d]} errors ({100 * after[d] / before[d]:.0f} % of before); accuracy "
                  f"{r['before']['accuracy']:.2f} -> {r['after']['accuracy']:.2f} %; LoRA off == before: "
                  f"{r['disabled'] == r['before']}; frozen weights bit-identical: {r['frozen_weights_unchanged']}; "
                  f"wall time {r['seconds']['total']} s (pre-training {r['seconds']['pretrain']} s).", "",
                  digit_table(r), ""]
    return lines


def report_section(experiment: str, title: str) -> list[str]:
    """The first table (and the lines just before it) of a committed report.md."""
    path = ROOT / "results" / experiment / "report.md"
    if not path.exists():
        return []
    text = path.read_text()
    table = re.search(r"(?:^\|.*\n)+", text, re.M)
    return [f"## Results: {title} (`results/{experiment}/report.md`)", "", table.group(0) if table else text[:2000], ""]


def main() -> None:
    body = digit_finetune()
    body += report_section("clora-table", "C-LoRA compression on Fashion-MNIST")
    body += report_section("peft-compare", "methods side by side on MiniLM")
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = re.sub(r"<!-- results -->.*?<!-- /results -->", lambda _: "<!-- results -->\n" + "\n".join(body) + "<!-- /results -->",
                 text, flags=re.S)
    readme.write_text(new)


if __name__ == "__main__":
    main()
