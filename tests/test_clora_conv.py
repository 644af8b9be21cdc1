"""``lorakit run clora-conv``: a smoke run on a few hundred real Fashion-MNIST images (integration) with a narrow
net, checked against a hand count of its parameters; ``--resume``; the CIFAR-10 path on CIFAR-format batches the
test writes; and the answers to bad input. No accuracy is asserted (a few steps on 300 images learn little)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from lorakit.data.vision import FASHION_MNIST

WIDTHS, HIDDEN = (4, 8), 16
HAS_FASHION = (Path(FASHION_MNIST.system_dir) / "train-labels-idx1-ubyte.gz").is_file() or \
    (Path(FASHION_MNIST.system_dir) / "train-labels-idx1-ubyte").is_file()


def _argv(out, *extra):
    return ["run", "clora-conv", "--widths", ",".join(map(str, WIDTHS)), "--hidden", str(HIDDEN), "--train-size",
            "300", "--test-size", "200", "--seeds", "0,1", "--ranks", "2,3", "--epochs", "1", "--dense-epochs", "1",
            "--variants", "dense,noise+bias,svd,asvd+finetune", "--inits", "svd", "--calibration-size", "64",
            "--threads", "1", "--timing-rounds", "1", "--timing-batch", "32", "--state-every", "2", "--out", str(out),
            *extra]


def _dense_parameters(in_channels: int) -> dict[str, int]:
    """Weights + biases of vgg_small(widths=(4, 8), hidden=16) by hand: 3x3 convs, fc1 (8 * 4 * 4 -> 16), fc2."""
    return {"features.conv1_1": 4 * in_channels * 9 + 4, "features.conv1_2": 4 * 4 * 9 + 4,
            "features.conv2_1": 8 * 4 * 9 + 8, "features.conv2_2": 8 * 8 * 9 + 8,
            "classifier.fc1": 16 * 128 + 16, "classifier.fc2": 10 * 16 + 10}


def _low_rank(rank: int, in_channels: int) -> dict[str, int]:
    """A (r, in, 3, 3) or (r, in) + B (out, r) + C (out,) of each layer that rank r makes smaller."""
    shapes = {"features.conv1_1": (4, in_channels * 9), "features.conv1_2": (4, 36), "features.conv2_1": (8, 36),
              "features.conv2_2": (8, 72), "classifier.fc1": (16, 128)}
    return {name: rank * (n_in + n_out) + n_out for name, (n_out, n_in) in shapes.items()
            if rank * (n_in + n_out) < n_in * n_out}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if not HAS_FASHION:
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    from lorakit.cli import main

    out = tmp_path_factory.mktemp("conv") / "out"
    assert main(_argv(out)) == 0
    return out


@pytest.mark.integration
def test_rows_and_ratios_match_a_hand_count(smoke_run):
    rows = json.loads((smoke_run / "results.json").read_text())["rows"]
    keys = sorted((r["variant"], r["rank"] or 0, r["seed"]) for r in rows)
    assert keys == sorted([("dense", 0, s) for s in (0, 1)] +
                          [(v, r, s) for v in ("noise+bias", "svd", "asvd+finetune") for r in (2, 3) for s in (0, 1)])
    dense = _dense_parameters(1)
    total = sum(dense.values())  # 3,302
    assert _low_rank(3, 1).keys() == dense.keys() - {"features.conv1_1", "classifier.fc2"}  # 3 * 13 > 36: stays dense
    for row in rows:
        if row["variant"] == "dense":
            assert row["parameters"] == total and row["compression_ratio"] == 1.0
            continue
        kept = _low_rank(row["rank"], 1)
        assert row["compressed_layers"] == list(kept)
        assert row["compression_ratio"] == pytest.approx(sum(kept.values()) / total, abs=1e-12)
        uncompressed = sum(v for k, v in dense.items() if k not in kept)
        assert row["parameters"] == sum(kept.values()) + uncompressed
        assert row["model_ratio"] == pytest.approx(row["parameters"] / total, abs=1e-12)
        assert 0 < row["file_ratio"] < 1 and 0 <= row["accuracy"] <= 100
    steps = {r["steps"] for r in rows if r["variant"] in ("noise+bias", "asvd+finetune")}
    assert steps == {5}  # equal budget: 300 images, batch 64, 1 epoch, for C-LoRA and the SVD fine-tune
    assert all(r["inference_ratio"] > 0 for r in rows if r["variant"] == "svd")
    report = (smoke_run / "report.md").read_text()
    assert "rank 3: features.conv1_2, features.conv2_1" in report and "## Targets" in report
    assert (smoke_run / "accuracy_vs_ratio.png").stat().st_size > 0
    assert list((smoke_run / "dense").glob("*.safetensors")) and not list((smoke_run / "cells").glob("*.state"))


@pytest.mark.integration
def test_resume_trains_nothing_finished(smoke_run, monkeypatch):
    from lorakit.cli import main
    from lorakit.experiments import clora_conv

    before = json.loads((smoke_run / "results.json").read_text())["rows"]
    monkeypatch.setattr(clora_conv, "ConvTask", lambda *a, **k: pytest.fail("data loaded or a model trained"))
    assert main(_argv(smoke_run, "--resume")) == 0
    after = json.loads((smoke_run / "results.json").read_text())["rows"]
    assert after == before


def _write_cifar(root: Path, per_batch: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        rng = np.random.default_rng(seed)
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))


def test_cifar10_path_runs_on_cifar_format_batches(tmp_path, monkeypatch):
    from lorakit.cli import main
    from lorakit.data import vision

    _write_cifar(tmp_path / "data", per_batch=12)
    monkeypatch.setitem(vision.CIFAR_COUNTS, "train", 60)  # the real set has 50,000 and 10,000
    monkeypatch.setitem(vision.CIFAR_COUNTS, "test", 12)
    out = tmp_path / "out"
    argv = _argv(out, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"))
    argv[argv.index("--variants") + 1], argv[argv.index("--seeds") + 1] = "dense,svd", "0"
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    dense = _dense_parameters(3)  # three colour channels into conv1_1
    assert rows[0]["variant"] == "dense" and rows[0]["parameters"] == sum(dense.values())
    svd = [r for r in rows if r["variant"] == "svd" and r["rank"] == 2][0]
    assert svd["compression_ratio"] == pytest.approx(sum(_low_rank(2, 3).values()) / sum(dense.values()))


def test_missing_cifar10_says_how_to_get_it(tmp_path, capsys):
    from lorakit.cli import main

    assert main(_argv(tmp_path / "out", "--dataset", "cifar10", "--data-dir", str(tmp_path))) == 1
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "mnist"], "invalid choice"),
    (["--variants", "dense,prune"], "unknown variants"),
    (["--widths", "4,0"], "widths and hidden must be positive"),
    (["--train-size", "0"], "train_size and test_size must be >= 1"),
    (["--timing-batch", "0"], "timing_batch must be >= 1"),
    (["--timing-rounds", "-1"], "timing_rounds must be >= 0"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, extra, message):
    from lorakit.cli import main

    try:
        code = main(_argv(tmp_path / "out", *extra))
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    assert code in (1, 2)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_rank_that_compresses_nothing_is_refused(tmp_path, capsys, monkeypatch):
    from lorakit.cli import main
    from lorakit.data import vision

    _write_cifar(tmp_path / "data", per_batch=2)
    monkeypatch.setitem(vision.CIFAR_COUNTS, "train", 10)
    monkeypatch.setitem(vision.CIFAR_COUNTS, "test", 2)
    argv = _argv(tmp_path / "out", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--train-size", "10")
    argv[argv.index("--ranks") + 1] = "2,16"  # 16 * (128 + 16) >= 128 * 16 for fc1, and more for every conv
    assert main(argv) == 1
    assert "ranks [16] compress none of" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_cell_killed_half_way_resumes_to_the_same_compressed_model(tmp_path, killed_at_decay_step):
    import torch

    import lorakit as lk
    from lorakit.experiments.compress_cells import Fit, clora_cell
    from lorakit.models import vgg_small
    from lorakit.train import TrainConfig

    torch.manual_seed(0)
    dense = vgg_small(widths=WIDTHS, hidden=HIDDEN)
    data = (torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    cfg = lk.CLoRAConfig(rank=2, targets=["features.conv1_2", "classifier.fc1"], decay_start=0.1, decay_end=0.9,
                         noise="scheduled", modules_to_save=["classifier.fc2"])

    def fit(resume: bool) -> Fit:  # 8 steps; the training state is saved every 2
        return Fit(data, TrainConfig(batch_size=16, epochs=2, seed=3, checkpoint_every=2), resume=resume)

    whole, _ = clora_cell(dense, cfg, 7, fit(False))
    state = tmp_path / "cell.state"
    with killed_at_decay_step(5):
        clora_cell(dense, cfg, 7, fit(True), state)
    assert state.is_file()
    resumed, history = clora_cell(dense, cfg, 7, fit(True), state)
    assert history.steps == 8 and not state.exists()
    expected = whole.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
