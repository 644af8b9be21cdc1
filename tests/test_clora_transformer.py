"""``lorakit run clora-transformer`` on a tiny random BERT and a small text file the tests write themselves.

The whole command (dense fine-tune, every variant, the report), the row schema, the ratios against a hand count of
the tiny model, equal training steps for C-LoRA and SVD + fine-tune, ``--resume`` (finished cells are not trained
again; a removed cell comes back identical), and the answers to bad input. No accuracy is asserted: a random tiny
model learns nothing worth asserting.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from tiny_text import WORDS, write_tiny_bert, write_tiny_csv  # noqa: E402

HIDDEN, LAYERS, RANK = 16, 2, 2


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_text_file(tmp_path_factory):
    return write_tiny_csv(tmp_path_factory.mktemp("data") / "tiny.csv")  # every 4th is test: 36 train, 12 test


def _argv(model, data, out, *extra):
    return ["run", "clora-transformer", "--model", str(model), "--dataset", str(data), "--ranks", str(RANK),
            "--seeds", "0,1", "--epochs", "1", "--dense-epochs", "1", "--batch-size", "8", "--max-length", "12",
            "--threads", "1", "--timing-rounds", "1", "--timing-batch", "8", "--calibration-size", "16",
            "--state-every", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def smoke_run(tiny_model_folder, tiny_text_file, tmp_path_factory):
    from lorakit.cli import main

    out = tmp_path_factory.mktemp("run") / "out"
    argv = _argv(tiny_model_folder, tiny_text_file, out)
    assert main(argv) == 0
    return out, argv


def _rows(out):
    return json.loads((out / "results.json").read_text())["rows"]


def test_every_cell_is_a_row_with_the_schema(smoke_run):
    out, _ = smoke_run
    rows = _rows(out)
    keys = [(r["variant"], r["init"], r["rank"], r["seed"]) for r in rows]
    expected = [(v, i, RANK, s) for s in (0, 1) for v, i in [("noise+bias", "random"), ("noise+bias", "svd"),
                                                             ("wds", "random"), ("wds", "svd"), ("svd", None),
                                                             ("svd+finetune", None), ("asvd+finetune", None)]]
    assert sorted(keys, key=str) == sorted(expected + [("dense", None, None, 0), ("dense", None, None, 1)], key=str)
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 100.0
        assert {"compression_ratio", "file_ratio", "model_ratio", "train_seconds", "parameters"} <= set(row)
    # equal budget: every trained compressed cell takes the same steps (36 texts, batch 8, 1 epoch)
    assert {r["steps"] for r in rows if r["variant"] not in ("dense", "svd")} == {5}
    assert all(r["inference_ratio"] > 0 for r in rows if r["variant"] == "svd")
    assert not list((out / "cells").glob("*.state"))  # finished cells leave no training state behind
    report = (out / "report.md").read_text()
    assert report.startswith("# C-LoRA on a pretrained transformer") and "## Targets" in report
    assert "C-LoRA minus SVD per seed" in report and "## Inference time" in report
    assert (out / "accuracy_vs_ratio.png").stat().st_size > 0


def test_ratios_match_a_hand_count_of_the_tiny_bert(smoke_run):
    out, _ = smoke_run
    attention = LAYERS * 4 * (HIDDEN * HIDDEN + HIDDEN)  # Q, K, V, O weights and biases: 2176
    low_rank = LAYERS * 4 * (RANK * HIDDEN + HIDDEN * RANK)  # A and B
    bias = LAYERS * 4 * HIDDEN  # C (C-LoRA's bias variants) or the kept bias (SVD)
    embeddings = (5 + len(WORDS)) * HIDDEN + 64 * HIDDEN + 2 * HIDDEN + 2 * HIDDEN
    per_layer = 4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HIDDEN + (HIDDEN * 32 + 32) + (32 * HIDDEN + HIDDEN) + 2 * HIDDEN
    total = embeddings + LAYERS * per_layer + (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * 2 + 2)  # + pooler + classifier
    for row in _rows(out):
        if row["variant"] == "dense":
            assert row["parameters"] == total and row["compression_ratio"] == row["model_ratio"] == 1.0
            continue
        kept = low_rank + (0 if row["variant"] == "wds" else bias)
        assert row["compression_ratio"] == pytest.approx(kept / attention, abs=1e-12), row
        assert row["parameters"] == total - attention + kept
        assert row["model_ratio"] == pytest.approx((total - attention + kept) / total, abs=1e-12)
        assert len(row["compressed_layers"]) == LAYERS * 4
        assert 0 < row["file_ratio"] < 1


def test_resume_skips_finished_cells_and_remakes_a_missing_one(smoke_run, monkeypatch):
    from lorakit.cli import main
    from lorakit.experiments import compress_task

    out, argv = smoke_run
    before = json.loads((out / "results.json").read_text())
    calls = []
    real = compress_task.clora_cell
    monkeypatch.setattr(compress_task, "clora_cell", lambda *a, **k: calls.append("clora") or real(*a, **k))
    monkeypatch.setattr(compress_task, "svd_cell", lambda *a, **k: pytest.fail("a finished SVD cell ran again"))
    dropped = next(r for r in before["rows"] if (r["variant"], r["init"], r["seed"]) == ("noise+bias", "svd", 1))
    trimmed = dict(before, rows=[r for r in before["rows"] if r is not dropped])
    (out / "results.json").write_text(json.dumps(trimmed))
    assert main(argv + ["--resume"]) == 0
    assert calls == ["clora"]  # only the missing cell trained; the dense model came from the cache
    after = {(r["variant"], r["init"], r["seed"]): r for r in _rows(out)}
    remade = after[("noise+bias", "svd", 1)]
    for field in ("accuracy", "compression_ratio", "file_ratio", "parameters", "steps"):
        assert remade[field] == dropped[field], field
    assert len(after) == len(before["rows"])


@pytest.mark.parametrize("extra, message", [
    (["--variants", "dense,lora"], "unknown variants"),
    (["--inits", "gaussian"], "unknown inits"),
    (["--ranks", "0"], "ranks must be integers >= 1"),
    (["--ranks", "12"], "compress none of"),  # 12 * (16 + 16) >= 16 * 16: no layer gets smaller
    (["--per-class-test", "0"], "per_class_test must be >= 1"),
    (["--distill", "1.5"], "distill must be in [0, 1]"),
    (["--distill-temperature", "0"], "distill_temperature must be > 0"),
])
def test_bad_input_is_refused_with_what_would_be_right(tiny_model_folder, tiny_text_file, tmp_path, capsys, extra,
                                                       message):
    from lorakit.cli import main

    assert main(_argv(tiny_model_folder, tiny_text_file, tmp_path / "out", *extra)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_resume_with_another_protocol_is_refused(smoke_run, capsys):
    from lorakit.cli import main

    out, argv = smoke_run
    argv = list(argv)
    argv[argv.index("--max-length") + 1] = "10"
    assert main(argv + ["--resume"]) == 1
    assert "max_length=12" in capsys.readouterr().err


def test_distilled_cells_learn_from_the_dense_model_and_say_so(tiny_model_folder, tiny_text_file, tmp_path,
                                                                monkeypatch):
    from lorakit.cli import main
    from lorakit.experiments import compress_task

    used, made = [], []  # (which loss, its teacher) at every training step that called it; the losses made
    real = compress_task.distillation_loss

    def counting(teacher, *args):
        loss_fn, which = real(teacher, *args), len(made)  # a number, not id(): a freed loss's id comes back
        made.append(loss_fn)
        return lambda model, batch: used.append((which, teacher)) or loss_fn(model, batch)

    monkeypatch.setattr(compress_task, "distillation_loss", counting)
    out = tmp_path / "out"
    argv = _argv(tiny_model_folder, tiny_text_file, out, "--distill", "0.5")
    argv[argv.index("--seeds") + 1] = "0"
    assert main(argv + ["--variants", "dense,wds,svd,svd+finetune", "--inits", "svd"]) == 0
    assert len({key for key, _ in used}) == 2  # wds and svd+finetune; the plain svd trains nothing
    assert len(used) == 2 * 5 and not any(teacher.training for _, teacher in used)  # 5 steps each, an eval teacher
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["distill"] == 0.5
    assert "also learns from the dense model" in (out / "report.md").read_text()


def test_resume_of_a_table_made_before_distillation_existed(smoke_run, tmp_path, monkeypatch):
    """A results.json without the newer protocol fields was made with their defaults: it resumes."""
    import shutil

    from lorakit.cli import main
    from lorakit.experiments import clora_transformer

    out, argv = smoke_run
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    old = json.loads((copy / "results.json").read_text())
    for key in ("distill", "distill_temperature"):
        del old["config"][key]
    (copy / "results.json").write_text(json.dumps(old))
    monkeypatch.setattr(clora_transformer, "TransformerTask", lambda *a, **k: pytest.fail("a cell ran again"))
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(copy)
    assert main(argv + ["--resume"]) == 0
