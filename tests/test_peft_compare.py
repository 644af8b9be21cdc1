"""A tiny smoke run of ``lorakit run peft-compare`` on a random BERT and a small text file it writes itself.

It checks that the harness runs every row end to end and writes its files; it asserts no timings and no
accuracies (a random tiny model learns nothing worth asserting in a few steps).
"""
from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

WORDS = ["cat", "dog", "bird", "fish", "car", "bus", "train", "boat", "red", "blue", "green", "small", "big"]


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    import torch
    from transformers import BertForSequenceClassification, BertTokenizer

    from lorakit.models.hf import tiny_bert_config

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=5 + len(WORDS), max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    lines = ["text,label"]
    for i in range(48):
        label = rng.randrange(2)
        words = rng.sample(WORDS[:4] if label == 0 else WORDS[4:8], 2) + rng.sample(WORDS[8:], 2)
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_peft_compare_smoke(tiny_model_folder, tiny_text_file, tmp_path):
    from lorakit.cli import main

    out = tmp_path / "run"
    code = main(["run", "peft-compare", "--model", str(tiny_model_folder), "--dataset", str(tiny_text_file),
                 "--epochs", "1", "--batch-size", "8", "--max-length", "12", "--num-tokens", "3", "--rank", "2",
                 "--bottleneck", "2", "--clora-rank", "2", "--timing-rounds", "2", "--timing-steps", "1",
                 "--skip-memory", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["implementation"]) for r in results["rows"]}
    assert {("full", "lorakit"), ("lora", "lorakit"), ("lora", "peft"), ("adapter", "lorakit"),
            ("prompt", "lorakit"), ("prompt", "peft")} <= rows
    for row in results["rows"]:
        assert 0.0 <= row["accuracy"] <= 100.0
        assert 0 < row["trainable_parameters"] <= row["total_parameters"]
        assert row["checkpoint_bytes"] > 0
        assert row["step_time_ratio"] > 0
    lora = {r["implementation"]: r for r in results["rows"] if r["method"] == "lora"}
    assert lora["lorakit"]["trainable_parameters"] == lora["peft"]["trainable_parameters"]
    prompt = {r["implementation"]: r for r in results["rows"] if r["method"] == "prompt"}
    assert prompt["lorakit"]["trainable_parameters"] == prompt["peft"]["trainable_parameters"]
    assert (out / "report.md").read_text().startswith("# peft-compare")
    assert (out / "accuracy_vs_params.png").stat().st_size > 0


def test_memory_probe_in_process(tiny_model_folder):
    # The run does this in a fresh subprocess per row; here once in-process, to keep the test fast.
    from lorakit.experiments.peft_compare import memory_probe

    settings = {"model": str(tiny_model_folder), "num_labels": 2, "max_length": 12, "rank": 2, "bottleneck": 2,
                "num_tokens": 3, "clora_rank": 2}
    memory = memory_probe("lora", "lorakit", settings, ["cat dog red", "car bus big"], [0, 1], steps=1, seed=0)
    assert memory["peak_memory_mb"] > 0 and memory["training_memory_mb"] >= 0


def test_combine_merges_parallel_parts(tmp_path):
    # Rows trained in separate processes plus a timing/memory-only run become one report.
    from lorakit.experiments.peft_compare import combine

    def part(name, rows):
        folder = tmp_path / name
        folder.mkdir()
        results = {"experiment": "peft-compare", "config": {"model": "m", "dataset": "d", "epochs": 1.0,
                                                            "batch_size": 2, "max_length": 8, "seeds": "0"},
                   "base_parameters": 100, "label_names": ["a", "b"], "train_examples": 4, "test_examples": 2,
                   "notes": ["a note"], "rows": rows, "wall_seconds": 1.0, "metadata": {"command": name}}
        (folder / "results.json").write_text(json.dumps(results))
        return folder

    trained = {"trainable_parameters": 10, "total_parameters": 110, "added_parameters": 10, "checkpoint_bytes": 99}
    a = part("a", [{"method": "lora", "implementation": "lorakit", "seed": 0, "accuracy": 50.0, **trained}])
    b = part("b", [{"method": "lora", "implementation": "peft", "seed": 0, "accuracy": 100.0, **trained}])
    timing = part("t", [{"method": m, "implementation": i, "seed": 0, "step_time_ratio": r, "peak_memory_mb": 5.0}
                        for m, i, r in [("lora", "lorakit", 1.0), ("lora", "peft", 1.5)]])
    out = tmp_path / "out"
    assert combine([a, b, timing], out) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["implementation"], r["accuracy"], r["step_time_ratio"]) for r in results["rows"]] == \
        [("lorakit", 50.0, 1.0), ("peft", 100.0, 1.5)]
    assert results["notes"] == ["a note"] and len(results["parts"]) == 3
    assert "-50.00" in (out / "report.md").read_text()


def test_rows_from_log(tmp_path):
    from lorakit.experiments.peft_compare import rows_from_log

    log = tmp_path / "run.log"
    log.write_text("[peft-compare] lora/lorakit seed 0\nnoise\n[peft-compare]   accuracy 88.67 % in 912 s\n"
                   "[peft-compare] lora/peft seed 0\n")  # the second row never finished
    assert rows_from_log(log) == [{"method": "lora", "implementation": "lorakit", "seed": 0, "accuracy": 88.67,
                                   "train_seconds": 912.0, "recovered_from_log": "run.log"}]
