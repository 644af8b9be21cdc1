"""The report writer: results.json, report.md, PNG figures."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.report import (
    bar_chart_wrong_counts, line_plot, markdown_table, run_metadata, to_jsonable, write_report, write_results,
)
from lorakit.train import EvalResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_run_metadata_has_versions_and_time(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    meta = run_metadata()
    assert meta["torch"] == torch.__version__
    assert meta["lorakit"] and meta["python"] and meta["time"].endswith("+00:00")
    assert meta["world_size"] == 1
    json.dumps(meta)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    assert run_metadata()["world_size"] == 2


def test_results_json_round_trip(tmp_path):
    results = {
        "experiment": "digit-finetune",
        "parameters": {"base": 2807010, "adapter": 6794, "increment_percent": 0.242},
        "before": {"accuracy": 95.3, "wrong_per_class": [33, 28, 42, 95, 19, 10, 61, 52, 19, 107]},
        "frozen_weights_unchanged": True,
    }
    path = write_results(tmp_path / "run", results)
    assert path == tmp_path / "run" / "results.json"
    loaded = json.loads(path.read_text())
    assert {k: loaded[k] for k in results} == results
    assert loaded["metadata"]["torch"] == torch.__version__
    assert "metadata" not in results  # the caller's dict is not modified
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_to_jsonable_handles_library_types():
    value = {
        "eval": EvalResult.from_counts([1, 0], [2, 0]),
        "tensor": torch.tensor([1.5, 2.0]),
        "numpy": np.int64(3),
        "path": Path("a/b"),
        "nan": float("nan"),
    }
    out = to_jsonable(value)
    assert out["eval"]["per_class_accuracy"] == [50.0, None]
    assert out["tensor"] == [1.5, 2.0] and out["numpy"] == 3 and out["path"] == "a/b" and out["nan"] is None
    json.dumps(out, allow_nan=False)


def test_markdown_table_formatting():
    table = markdown_table(["rank", "variant", "accuracy"], [[16, "Only WDS", 82.1], [32, "Bias | C", 83.934]])
    assert table.splitlines() == [
        "| rank | variant | accuracy |",
        "|---:|---|---:|",
        "| 16 | Only WDS | 82.10 |",
        "| 32 | Bias \\| C | 83.93 |",
    ]
    assert markdown_table(["x"], [[1.23456]], floatfmt=".3f").splitlines()[-1] == "| 1.235 |"
    assert markdown_table(["x", "y"], [[None, float("nan")]]).splitlines()[-1] == "| — | — |"


def test_markdown_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="2 columns"):
        markdown_table(["a", "b"], [[1]])


def test_write_report(tmp_path):
    path = write_report(tmp_path, "# Title\n\n" + markdown_table(["a"], [[1]]))
    assert path.name == "report.md"
    assert path.read_text().startswith("# Title") and path.read_text().endswith("|\n")


def test_bar_chart_is_a_png(tmp_path):
    path = bar_chart_wrong_counts(tmp_path / "fig" / "wrong.png", [33, 28, 107], [53, 32, 11],
                                  labels=["0", "1", "9"], title="digit 9")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert not list(path.parent.glob("*.tmp"))


def test_bar_chart_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        bar_chart_wrong_counts(tmp_path / "x.png", [1, 2], [1])


def test_line_plot_is_a_png(tmp_path):
    path = line_plot(
        tmp_path / "acc.png",
        {"Only WDS": ([9.9, 19.5, 38.9], [82.1, 83.2, 82.87])},
        xlabel="compression ratio (%)", ylabel="accuracy (%)", title="C-LoRA",
        points={"seed 002": ([9.9, 19.5], [83.74, 83.93])}, logx=True,
    )
    assert path.read_bytes().startswith(PNG_SIGNATURE)
