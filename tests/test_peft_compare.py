"""``lorakit run peft-compare`` on a tiny random BERT and a small text file the tests write themselves.

The one-command path end to end (sweep, cells, equivalence, differences, report), the resume (a second run trains
nothing), lorakit-from-PEFT's-start computing PEFT's losses to 1e-6, and AdapterHub's row when its environment is
missing. No timings and no accuracies are asserted (a random tiny model learns nothing worth asserting).
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_text import write_tiny_bert, write_tiny_csv  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_text_file(tmp_path_factory):
    return write_tiny_csv(tmp_path_factory.mktemp("data") / "tiny.csv", rows=64)  # every 4th is test: 48 + 16


def _argv(model, data, out, *extra):
    return ["run", "peft-compare", "--model", str(model), "--dataset", str(data), "--per-class-val", "4",
            "--seeds", "0,1", "--epochs", "2", "--batch-size", "8", "--max-length", "12", "--num-tokens", "3",
            "--rank", "2", "--bottleneck", "2", "--clora-rank", "2", "--threads", "1", "--warmup-steps", "2",
            "--lr-full", "1e-3", "--lr-lora", "1e-3,1e-2", "--lr-adapter", "1e-2,1e30", "--lr-prompt", "1e-2",
            "--lr-clora", "1e-2", "--timing-rounds", "2", "--timing-steps", "1", "--skip-memory", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def smoke_run(tiny_model_folder, tiny_text_file, tmp_path_factory):
    """One run of the whole command, AdapterHub's environment pointed at a folder that does not exist."""
    from lorakit.cli import main
    from lorakit.experiments import peft_compare_cells

    root = tmp_path_factory.mktemp("run")
    (root / "no-env.log").write_text("Collecting adapters\nERROR: No matching distribution found for adapters\n")
    out = root / "out"
    argv = _argv(tiny_model_folder, tiny_text_file, out, "--adapters-env", str(root / "no-env"))
    trained, run_row = [], peft_compare_cells.run_row

    def counting(method, implementation, settings, train, test, cfg, seed, **kwargs):
        trained.append((method, implementation, seed, cfg.lr))
        return run_row(method, implementation, settings, train, test, cfg, seed, **kwargs)

    peft_compare_cells.run_row = counting
    try:
        assert main(argv) == 0
    finally:
        peft_compare_cells.run_row = run_row
    return out, argv, trained


def test_one_command_makes_every_row_with_its_evidence(smoke_run):
    out, _, trained = smoke_run
    # Each cell trains once: the sweep's cell of the chosen rate at the first seed is that row's seed-0 cell.
    assert len(trained) == len(set(trained)) == 7 + 9  # sweep: 1+2+2+1+1 rates; then 7 rows x 2 seeds - 5 reused
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["classes"] == ["0", "1"]
    assert results["test_size"] == 16 and results["train_size"] == 48 - 8
    rows = {(r["method"], r["implementation"], r["seed"]) for r in results["rows"]}
    expected = {("full", "lorakit"), ("lora", "lorakit"), ("lora", "peft"), ("adapter", "lorakit"),
                ("prompt", "lorakit"), ("prompt", "peft")}
    assert {(m, i, s) for m, i in expected for s in (0, 1)} <= rows
    steps = results["steps"]
    assert steps == 2 * 5  # 40 training examples, batch 8, 2 epochs
    for row in results["rows"]:
        assert row["steps"] == steps and row["lr"] > 0 and row["threads"] == 1
        assert 0.0 <= row["accuracy"] <= 100.0 and row["step_time_ratio"] > 0
        assert "recovered_from_log" not in row
        cell = json.loads((out / row["cell"]).read_text())
        assert len(cell["losses"]) == steps and cell["val_steps"] == [5, 10]
        assert cell["train_config"]["lr"] == row["lr"] and "git_commit" in cell
    # The sweep ran on validation accuracy, and the chosen rate is what both LoRA rows used.
    lora_sweep = [s for s in results["sweep"] if s["method"] == "lora"]
    assert [s["lr"] for s in lora_sweep] == [1e-3, 1e-2] and sum(s["chosen"] for s in lora_sweep) == 1
    chosen = next(s["lr"] for s in lora_sweep if s["chosen"])
    assert {r["lr"] for r in results["rows"] if r["method"] == "lora"} == {chosen}
    adapter_sweep = {s["lr"]: s for s in results["sweep"] if s["method"] == "adapter"}
    assert adapter_sweep[1e30]["diverged"] and not adapter_sweep[1e30]["chosen"]  # a diverged rate is passed over
    assert adapter_sweep[1e-2]["chosen"]
    assert {d["method"] for d in results["differences"]} == {"lora", "prompt"}
    for d in results["differences"]:
        assert d["n"] == 2 and d["ci95_low_pp"] <= d["mean_pp"] <= d["ci95_high_pp"]
    assert {e["method"] for e in results["equivalence"]} == {"lora", "prompt"}
    report = (out / "report.md").read_text()
    assert report.startswith("# peft-compare") and "## Learning-rate sweep" in report
    assert (out / "accuracy_vs_params.png").stat().st_size > 0


def test_same_start_gives_peft_losses_to_1e6(smoke_run):
    # The equivalence check of the run: lorakit from PEFT's initial adapter, same data order and dropout masks.
    out, _, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    for entry in results["equivalence"]:
        assert entry["steps"] == results["steps"] and entry["seeds"] == [0, 1]
        assert entry["max_abs_loss_diff"] <= 1e-6, entry
    # and the test is able to fail: lorakit's own initialisation is a different start
    lorakit = json.loads((out / "cells" / "lora-lorakit-seed0-lr0.01.json").read_text())
    assert lorakit["start"] == "PEFT's initial weights"


def test_same_start_copies_peft_initial_adapter(tiny_model_folder):
    import torch

    from lorakit.experiments.peft_compare_models import build

    settings = {"model": str(tiny_model_folder), "num_labels": 2, "max_length": 12, "rank": 2, "num_tokens": 3}
    for method in ("lora", "prompt"):
        peft_model, _ = build(method, "peft", settings, seed=5)
        same, _ = build(method, "lorakit", settings, seed=5, same_start=True)
        own, _ = build(method, "lorakit", settings, seed=5)
        if method == "lora":
            name = "bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
            theirs = dict(peft_model.named_parameters())["base_model.model." + name]
            mine, others = dict(same.named_parameters())[name], dict(own.named_parameters())[name]
        else:
            theirs = peft_model.get_prompt_embedding_to_save("default")
            mine, others = same.lorakit_prompt.prompts["default"], own.lorakit_prompt.prompts["default"]
        assert torch.equal(mine, theirs), method
        if method == "prompt":  # lorakit draws other vocabulary rows: without the copy the starts differ
            assert not torch.equal(others, theirs)
        # (lorakit's own LoRA init draws the same Kaiming-uniform A as PEFT from the same RNG state; the copy
        # makes that a guarantee instead of a coincidence of draw order)


def test_resume_trains_nothing(smoke_run, monkeypatch):
    from lorakit.cli import main
    from lorakit.experiments import peft_compare_cells

    out, argv, _ = smoke_run
    before = json.loads((out / "results.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(peft_compare_cells, "run_row", no_training)
    assert main([a for a in argv] + ["--resume"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert [(r["cell"], r["accuracy"]) for r in after["rows"]] == [(r["cell"], r["accuracy"]) for r in before["rows"]]
    assert after["equivalence"] == before["equivalence"]


def test_rerun_without_resume_is_refused(smoke_run):
    from lorakit.cli import main

    out, argv, _ = smoke_run
    assert main(argv) == 1  # "already holds finished cells; pass --resume"


def test_resume_with_other_settings_is_refused(smoke_run, capsys):
    from lorakit.cli import main

    out, argv, _ = smoke_run
    argv = list(argv)
    argv[argv.index("--max-length") + 1] = "10"
    assert main(argv + ["--resume"]) == 1
    assert "max_length" in capsys.readouterr().err


def test_adapterhub_env_missing_is_reported_not_invented(smoke_run):
    out, _, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    assert not [r for r in results["rows"] if r["implementation"] == "adapters"]
    assert [(m["method"], m["implementation"]) for m in results["missing_rows"]] == [("adapter", "adapters")]
    assert "No matching distribution found for adapters" in results["missing_rows"][0]["reason"]
    report = (out / "report.md").read_text()
    assert "ERROR: No matching distribution found for adapters" in report
    assert "adapter/adapters row is missing" in report


def test_memory_probe_in_process(tiny_model_folder):
    # The run does this in a fresh subprocess per row; here once in-process, to keep the test fast.
    from lorakit.experiments.peft_compare_measure import memory_probe

    settings = {"model": str(tiny_model_folder), "num_labels": 2, "max_length": 12, "rank": 2, "bottleneck": 2,
                "num_tokens": 3, "clora_rank": 2}
    memory = memory_probe("lora", "lorakit", settings, ["cat dog red", "car bus big"], [0, 1], steps=1, seed=0)
    assert memory["peak_memory_mb"] > 0 and memory["training_memory_mb"] >= 0


def test_validation_is_carved_stratified_from_training():
    from lorakit.data.text import TextDataset
    from lorakit.experiments.text_task import split_validation

    data = TextDataset([f"t{i}" for i in range(30)], [i % 3 for i in range(30)], ["a", "b", "c"])
    train, val = split_validation(data, 2)
    assert val.class_counts() == [2, 2, 2] and train.class_counts() == [8, 8, 8]
    assert not set(train.texts) & set(val.texts) and val.texts == ["t0", "t1", "t2", "t3", "t4", "t5"]
    with pytest.raises(ValueError, match="per-class-val"):
        split_validation(data, 10)


def test_a_clora_row_killed_half_way_resumes_with_its_decay(tiny_model_folder, tiny_text_file, tmp_path,
                                                           killed_at_decay_step):
    # The decay schedule is part of the training state: a resumed row continues its decay where it stopped (without
    # it the decay would start again from d = 1 and the losses after the kill would differ from those of a row that
    # was never stopped).
    from lorakit.data.text import load_text_file
    from lorakit.experiments.peft_compare_cells import run_row
    from lorakit.train import TrainConfig

    data = load_text_file(tiny_text_file)
    settings = {"model": str(tiny_model_folder), "num_labels": 2, "max_length": 12, "clora_rank": 2}
    state = tmp_path / "clora.state"

    def row(resume: bool) -> dict:  # 16 steps; the training state is saved every 4
        cfg = TrainConfig(lr=1e-2, batch_size=8, epochs=2, log_every=1, checkpoint_every=4, progress=False,
                          state_path=str(state) if resume else None, resume=resume)
        return run_row("clora", "lorakit", settings, data, data, cfg, seed=0)

    whole = row(False)
    with killed_at_decay_step(6):
        row(True)
    assert state.is_file()
    resumed = row(True)
    assert resumed["steps"] == whole["steps"] == 16
    assert resumed["losses"] == whole["losses"]
    assert resumed["accuracy"] == whole["accuracy"]


@pytest.mark.parametrize("fails", [None, "timing", "memory"])
def test_measure_removes_adapterhub_head_file_whether_phases_finish_or_fail(tmp_path, monkeypatch, fails):
    """AdapterHub's row is measured from lorakit's head saved in cells/; that file goes in every case."""
    from lorakit.experiments import peft_compare

    cells, jobs = tmp_path / "cells", []
    cells.mkdir()

    def save_head(settings, seed, path):
        path.write_bytes(b"head")
        return path

    def fail_or(phase, value):
        def run(*args, **kwargs):
            if fails == phase:
                raise RuntimeError(f"{phase} failed")
            return value(*args, **kwargs)
        return run

    monkeypatch.setattr(peft_compare.adapterhub, "save_initial_head", save_head)
    monkeypatch.setattr(peft_compare.adapterhub, "common_job", lambda *a: {"model": "m"})
    monkeypatch.setattr(peft_compare.adapterhub, "batch_job", lambda common, *a: {**common, "kind": "batch"})
    monkeypatch.setattr(peft_compare.adapterhub, "StepServer", lambda env, job, folder: type(
        "Server", (), {"close": lambda self: None})())
    monkeypatch.setattr(peft_compare, "TextCollator", lambda *a: lambda examples: {"n": len(examples)})
    monkeypatch.setattr(peft_compare, "step_time_ratios", fail_or(
        "timing", lambda rows, *a, external: {r: {"step_time_ratio": 1.0} for r in [*rows, *external]}))
    monkeypatch.setattr(peft_compare.adapterhub, "measure_memory", fail_or(
        "memory", lambda env, job, folder: jobs.append(job) or {"peak_rss_bytes": 1}))
    cfg = peft_compare.PeftCompareConfig(batch_size=2, memory_steps=3)
    rows = [("lora", "lorakit"), ("adapter", "adapters")]
    monkeypatch.setattr(peft_compare, "measure_memory", lambda *a: {"peak_rss_bytes": 2})
    args = (cfg, rows, {}, None, [("a", 0), ("b", 1)], cells, None, 0)
    if fails:
        with pytest.raises(RuntimeError, match=f"{fails} failed"):
            peft_compare.measure(*args)
    else:
        measured = peft_compare.measure(*args)
        assert measured[("adapter", "adapters")] == {"step_time_ratio": 1.0, "peak_rss_bytes": 1}
        assert jobs == [{"model": "m", "kind": "batch", "steps": 3}]
    assert list(cells.iterdir()) == []
