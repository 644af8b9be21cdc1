"""clora-table on its real data, shortened: its rows come from the compression harness (compress_task), C-LoRA
trains ``epochs`` and the SVD fine-tunes ``finetune_epochs`` (the seed's unequal budget), and ``--resume`` makes
nothing again."""
from __future__ import annotations

import json

import pytest

from lorakit.cli import main as cli_main

pytestmark = pytest.mark.integration

TABLE = ["run", "clora-table", "--variants", "dense,wds,svd,svd+finetune", "--inits", "svd", "--ranks", "16",
         "--seeds", "0", "--dense-epochs", "0.1", "--epochs", "0.1", "--finetune-epochs", "0.2", "--batch-size", "30",
         "--train-size", "600"]


def test_each_variant_trains_its_own_budget_and_a_resume_makes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "table"
    assert cli_main([*TABLE, "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == ["dense", "wds", "svd", "svd+finetune"]
    assert {v: r.get("steps") for v, r in rows.items()} == {"dense": None, "wds": 2, "svd": 0, "svd+finetune": 4}
    assert rows["wds"]["compressed_layers"] == ["fc1", "fc2"]
    # the seed's ratio: A + B + C of fc1 and fc2 (A, B of r = 16 and C, the bias) over all 235,146 dense parameters
    factors = 16 * (784 + 256) + 256 + 16 * (256 + 128) + 128
    assert rows["svd"]["compression_ratio"] == pytest.approx(factors / 235146)
    assert "inference_ratio" not in rows["svd"]  # --timing-rounds defaults to 0 here
    assert "## C-LoRA against SVD + fine-tune" in (out / "report.md").read_text()

    import lorakit.experiments.compress_task as compress_task
    monkeypatch.setattr(compress_task, "clora_cell", lambda *a, **k: pytest.fail("a finished row was made again"))
    monkeypatch.setattr(compress_task, "svd_cell", lambda *a, **k: pytest.fail("a finished row was made again"))
    assert cli_main([*TABLE, "--resume", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == list(rows.values())
