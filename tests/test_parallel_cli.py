"""``torchrun -m lorakit run ... --parallel ddp|fsdp``: same results as one process; bad launches refused."""
import json
import os
import subprocess
import sys

import pytest

from distributed_workers import free_port
from lorakit.cli import main as cli_main
from lorakit.experiments.digit_finetune import DigitFinetuneConfig, run

SHORT = ["--pretrain-steps", "120", "--steps", "20"]


@pytest.mark.integration
def test_two_process_digit_finetune_matches_one_process(tmp_path):
    single = run(DigitFinetuneConfig(pretrain_steps=120, steps=20, cache_dir=str(tmp_path / "c1")), tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "lorakit", "run", "digit-finetune", *SHORT, "--parallel", "ddp",
         "--cache-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert done.stdout.count("wrote ") == 1  # only rank 0 prints and writes
    assert two["before"] == single["before"]  # the same pre-trained model
    assert abs(two["after"]["accuracy"] - single["after"]["accuracy"]) <= 0.1
    assert two["frozen_weights_unchanged"] and two["disabled"] == two["before"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_parallel_without_a_process_group_is_refused_before_any_work(tmp_path, capsys, monkeypatch, parallel):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code = cli_main(["run", "digit-finetune", "--parallel", parallel, "--out", str(tmp_path / "o")])
    assert code == 1
    assert f"--parallel {parallel} needs a process group" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_several_processes_with_parallel_none_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli_main(["run", "digit-finetune", "--out", str(tmp_path / "o")])
    assert code == 1
    assert "pass --parallel ddp or --parallel fsdp" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def torchrun(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "lorakit", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_clora_table_matches_one_process(tmp_path, parallel):
    """FSDP2 trains a sharded twin of each model and gathers it back: C-LoRA's decay and compress see a plain one."""
    table = ["run", "clora-table", "--variants", "dense,noise+bias,svd+finetune", "--inits", "svd", "--ranks", "16",
             "--seeds", "0", "--epochs", "0.02", "--dense-epochs", "0.02", "--batch-size", "30", "--train-size", "1500"]
    assert cli_main([*table, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*table, "--parallel", parallel, "--out", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("one", "two"))
    assert [r["variant"] for r in two] == [r["variant"] for r in one]
    assert [r["accuracy"] for r in two] == pytest.approx([r["accuracy"] for r in one], abs=0.1)
    assert [r["compression_ratio"] for r in two] == [r["compression_ratio"] for r in one]
    assert not [p.name for p in (tmp_path / "two").rglob("*") if ".state" in p.name]  # no training state left


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_peft_compare_matches_one_process(tmp_path, parallel):
    """Every cell's per-step losses and test accuracy, lorakit's rows and PEFT's, as in one process."""
    pytest.importorskip("peft")
    from tiny_text import write_tiny_bert, write_tiny_csv

    model, data = write_tiny_bert(tmp_path / "bert", dropout=0.0), write_tiny_csv(tmp_path / "tiny.csv", rows=64)
    args = ["run", "peft-compare", "--model", str(model), "--dataset", str(data), "--per-class-val", "4",
            "--seeds", "0", "--epochs", "1", "--batch-size", "8", "--max-length", "12", "--num-tokens", "3",
            "--rank", "2", "--clora-rank", "2", "--methods", "lora,prompt,clora", "--implementations", "lorakit,peft",
            "--lr-lora", "1e-2", "--lr-prompt", "1e-2", "--lr-clora", "1e-2", "--threads", "1", "--skip-timing",
            "--skip-memory", "--state-every", "2"]  # states saved (DCP under fsdp), one right after a validation
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*args, "--parallel", parallel, "--out", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("[peft-compare] wrote") == 1  # rank 0 alone writes
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("one", "two"))
    assert [(r["method"], r["implementation"]) for r in two] == [(r["method"], r["implementation"]) for r in one]
    for a, b in zip(one, two):
        cells = [json.loads((tmp_path / d / r["cell"]).read_text()) for d, r in (("one", a), ("two", b))]
        assert cells[1]["losses"] == pytest.approx(cells[0]["losses"], abs=1e-5), a["cell"]
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-9), a["cell"]
    assert not [p.name for p in (tmp_path / "two").rglob("*") if ".state" in p.name]
