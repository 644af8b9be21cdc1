"""Write report.md of committed compression tables again from their results.json, with the current report code.

Nothing is computed and results.json is not touched: a report is a function of its results, so when that function
changes (e.g. a new interval), the committed reports follow with this command, and `git diff` shows what it changed.

Run: python scripts/render_reports.py results/clora-table results/clora-conv ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lorakit import report
from lorakit.experiments import clora_conv, clora_table, clora_transformer

RENDER = {"clora-table": clora_table.render, "clora-conv": clora_conv.render,
          "clora-transformer": clora_transformer.render}


def main(folders: list[str]) -> int:
    for folder in map(Path, folders):
        results = json.loads((folder / "results.json").read_text())
        if results.get("experiment") not in RENDER:
            print(f"{folder}: not a compression table ({results.get('experiment')!r}); choose from {', '.join(RENDER)}",
                  file=sys.stderr)
            return 1
        report.write_report(folder, RENDER[results["experiment"]](results))
        print(f"wrote {folder / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
