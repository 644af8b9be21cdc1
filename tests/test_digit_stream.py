"""digit-stream: rotation against closed forms, the continual-learning metrics on a hand-made matrix, replay,
a 2-stage smoke run on the real MNIST (integration) with --resume, and the CLI's answers to bad input."""
import json
import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.cli import main as cli_main
from lorakit.experiments import digit_stream as experiment
from lorakit.experiments.digit_stream import METHODS, DigitStreamConfig, is_plain, run
from lorakit.experiments.stream_data import (Stage, average_accuracy, backward_transfer, digit_stream, rotate,
                                             rotation_stream, seen_average, with_replay)
from lorakit.experiments.stream_report import compare_table, matrix_table


# -- rotation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("degrees,quarter_turns", [(0, 0), (90, 1), (180, 2), (270, 3), (-90, -1), (360, 0), (-180, 2)])
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 8, 8)])
def test_quarter_turns_equal_rot90_exactly(degrees, quarter_turns, shape):
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate(images, degrees), torch.rot90(images, quarter_turns, dims=(-2, -1)))


def test_half_turn_of_a_non_square_image_equals_rot90_twice():
    images = torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rotate(images, 180), torch.rot90(images, 2, dims=(-2, -1)))


@pytest.mark.parametrize("degrees", [20.0, 37.5, -65.0, 80.0])
def test_rotated_ramp_matches_the_closed_form(degrees):
    """Bilinear interpolation is exact on a linear ramp f(u, v) = a u + b v + c (u right, v down, from the centre),
    so inside the image the result must be f at the point turned back: counter-clockwise on screen by theta,
    output(u, v) = f(u cos t - v sin t, u sin t + v cos t)."""
    size, a, b, c = 28, 0.3, -0.7, 2.0
    centre = (size - 1) / 2
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float64) - centre,
                          torch.arange(size, dtype=torch.float64) - centre, indexing="ij")
    ramp = (a * u + b * v + c).reshape(1, 1, size, size)
    t = math.radians(degrees)
    expected = a * (u * math.cos(t) - v * math.sin(t)) + b * (u * math.sin(t) + v * math.cos(t)) + c
    inside = u ** 2 + v ** 2 <= 11 ** 2  # samples stay among the image's pixel centres
    got = rotate(ramp, degrees)[0, 0]
    assert torch.allclose(got[inside], expected[inside], atol=1e-9)
    assert not torch.allclose(rotate(ramp, -degrees)[0, 0][inside], expected[inside], atol=1e-3)  # direction matters


def test_fill_comes_in_from_outside_and_normalising_commutes_with_rotation():
    ones = torch.ones(1, 1, 28, 28)
    turned = rotate(ones, 45.0)
    assert turned[0, 0, 0, 0] == 0.0 and turned[0, 0, 14, 14] == 1.0  # corners come from outside: zero fill
    raw = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    mean, std = 0.1307, 0.3081
    normalised_then_turned = rotate((raw - mean) / std, 30.0, fill=-mean / std)
    assert torch.allclose(normalised_then_turned, (rotate(raw, 30.0) - mean) / std, atol=1e-5)


def test_rotate_wants_a_batch_of_images():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        rotate(torch.zeros(28, 28), 10.0)


# -- metrics --------------------------------------------------------------------------------------------
MATRIX = [[90.0, 10.0, 5.0],
          [80.0, 95.0, 20.0],
          [70.0, 85.0, 99.0]]


def test_average_accuracy_and_backward_transfer_on_a_hand_made_matrix():
    assert average_accuracy(MATRIX) == pytest.approx((70 + 85 + 99) / 3)
    assert backward_transfer(MATRIX) == pytest.approx(((70 - 90) + (85 - 95)) / 2)  # -15 pp
    assert seen_average(MATRIX) == pytest.approx([90.0, (80 + 95) / 2, (70 + 85 + 99) / 3])
    assert backward_transfer([[42.0]]) == 0.0
    no_forgetting = [[90.0, 1.0], [90.0, 97.0]]
    assert backward_transfer(no_forgetting) == 0.0


def test_metrics_refuse_a_matrix_that_is_not_square():
    with pytest.raises(ValueError, match="T x T"):
        backward_transfer([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="T x T"):
        average_accuracy([])


def test_replay_mixes_equal_shares_of_earlier_data_and_never_the_stage_digit():
    def data(label, n):
        return torch.utils.data.TensorDataset(torch.full((n, 1, 2, 2), float(label)), torch.full((n,), label))

    pretrain = torch.utils.data.TensorDataset(torch.arange(40.0).reshape(40, 1, 1, 1).expand(40, 1, 2, 2),
                                              torch.arange(40) % 4)
    stage = Stage("digit 3", data(3, 10), data(3, 2), digit=3)
    mixed = with_replay(stage, [pretrain, data(1, 30)], replay=2.0, seed=0)
    images, labels, replayed = mixed.tensors
    assert len(labels) == 30 and int(replayed.sum()) == 20 and not replayed[:10].any()
    assert (labels[:10] == 3).all() and not (labels[replayed] == 3).any()  # the new digit is not replayed
    assert int((labels[replayed] == 1).sum()) >= 10  # the earlier stage's share (plus any 1s of the pre-training)
    again = with_replay(stage, [pretrain, data(1, 30)], replay=2.0, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(mixed.tensors, again.tensors))  # seeded


def test_is_plain_sees_adapters_and_size():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    size = sum(p.numel() for p in model.parameters())
    assert is_plain(model, size)
    lk.inject(model, lk.LoRAConfig(rank=1, targets=["0"]))
    assert not is_plain(model, size)
    model = lk.unload(model, merge=True)
    assert is_plain(model, size) and not is_plain(model, size + 1)
    lk.inject(model, lk.LoRAConfig(rank=1, targets=["0"], mode="parametrize"))
    assert not is_plain(model, size)


# -- a 2-stage stream on the real MNIST ------------------------------------------------------------------
def smoke_config(tmp_path, **changes) -> DigitStreamConfig:
    options = dict(angles=[0.0, 40.0], seeds=[0], steps=4, batch_size=32, pretrain_steps=100, test_size=500,
                   stage_train_size=600, threads=1, cache_dir=str(tmp_path / "cache"))
    return DigitStreamConfig(**{**options, **changes})


@pytest.mark.integration
def test_two_stage_stream_then_resume_without_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    results = run(smoke_config(tmp_path), out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == "digit-stream" and saved["complete"] is True
    rows = {r["method"]: r for r in saved["rows"]}
    assert sorted(rows) == sorted(METHODS)
    for row in rows.values():
        matrix = row["accuracy_matrix"]
        assert len(matrix) == 2 and all(len(r) == 2 for r in matrix) and len(row["accuracy_before"]) == 2
        assert all(0.0 <= a <= 100.0 and a * 500 / 100 == pytest.approx(round(a * 5)) for r in matrix for a in r)
        assert row["average_accuracy"] == pytest.approx(sum(matrix[1]) / 2)
        assert row["backward_transfer"] == pytest.approx(matrix[1][0] - matrix[0][0])
        assert row["seed"] == 0 and row["stages"] == ["rotated 0°", "rotated 40°"]
    base = 2_807_010
    merge = rows["lora-merge"]
    assert merge["final_model_plain"] is True and merge["final_parameters"] == base
    assert merge["trained_parameters_per_stage"] == [4 * 6794] * 2  # rank 4 on the three Linears: 0.97 %
    assert rows["lora-preserve"]["final_model_plain"] is True
    assert rows["full"]["trained_parameters_per_stage"] == [base] * 2
    assert rows["adapters-per-stage"]["final_parameters"] == base + 2 * 4 * 6794
    oracle = rows["adapters-per-stage"]["accuracy_matrix"]
    assert oracle[1][0] == oracle[0][0]  # stage 0's own adapter, chosen by id, reproduces stage 0's accuracy
    assert saved["targets"]["lora_merge_plain_original_size"] is True
    for name in ["report.md", "average_accuracy.png", *[f"heatmap_{m}.png" for m in METHODS]]:
        assert (out / name).is_file()
    assert (out / "heatmap_full.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| before any stage |" in matrix_table(saved, "lora-preserve")
    after_first = [line for line in compare_table(saved, "lora-preserve").splitlines() if "after rotated 0°" in line][0]
    preserve_first, full_first = rows["lora-preserve"]["accuracy_matrix"][0][0], rows["full"]["accuracy_matrix"][0][0]
    assert f"| {preserve_first:.1f} / {full_first:.1f} |" in after_first
    cells = {p.name: p.read_bytes() for p in (out / "cells").iterdir()}
    assert len(cells) == len(METHODS)
    capsys.readouterr()

    def no_work(*args, **kwargs):
        raise AssertionError("a resumed run trained, evaluated or loaded data")

    for name in ("train", "evaluate", "load_data", "pretrained"):
        monkeypatch.setattr(experiment, name, no_work)
    again = run(smoke_config(tmp_path, resume=True), out)
    assert capsys.readouterr().out.count("skipped") == len(METHODS)
    assert {p.name: p.read_bytes() for p in (out / "cells").iterdir()} == cells
    assert again["rows"] == results["rows"]


def test_digit_stream_takes_the_worst_digits_first_and_tests_each_on_its_own_digit():
    labels = torch.arange(100) % 10
    train_set = torch.utils.data.TensorDataset(labels.float().reshape(100, 1, 1, 1), labels)
    test_set = torch.utils.data.TensorDataset(labels[:50].float().reshape(50, 1, 1, 1), labels[:50])
    wrong = [5, 9, 1, 9, 0, 0, 2, 0, 7, 0]  # 1 and 3 tie: the smaller digit first
    stages = digit_stream(train_set, test_set, wrong, stages=3, seed=0, stage_train_size=4)
    assert [s.digit for s in stages] == [1, 3, 8] and [s.name for s in stages] == ["digit 1", "digit 3", "digit 8"]
    for stage in stages:
        assert (stage.train.tensors[1] == stage.digit).all() and len(stage.train) == 4
        assert (stage.test.tensors[1] == stage.digit).all() and len(stage.test) == 5
        assert (stage.train.tensors[0].flatten() == stage.digit).all()  # images travel with their labels
    with pytest.raises(ValueError, match="--digit-stages must be between 1 and 10"):
        digit_stream(train_set, test_set, wrong, stages=11, seed=0)


def test_rotation_stream_uses_disjoint_training_subsets_and_one_test_set():
    labels = torch.arange(60) % 10
    images = torch.arange(60.0).reshape(60, 1, 1, 1).expand(60, 1, 4, 4).contiguous()
    train_set = torch.utils.data.TensorDataset(images, labels)
    test_set = torch.utils.data.TensorDataset(images[:20], labels[:20])
    stages = rotation_stream(train_set, test_set, [0.0, 90.0, 180.0], seed=3, test_size=8)
    ids = [set(s.train.tensors[0][:, 0, 1, 1].tolist()) for s in stages]  # an inner pixel keeps the image's id
    assert [len(i) for i in ids] == [20, 20, 20] and not (ids[0] & ids[1] or ids[1] & ids[2] or ids[0] & ids[2])
    assert [s.name for s in stages] == ["rotated 0°", "rotated 90°", "rotated 180°"]
    assert torch.equal(stages[1].test.tensors[0], torch.rot90(stages[0].test.tensors[0], 1, dims=(-2, -1)))
    assert all(torch.equal(s.test.tensors[1], stages[0].test.tensors[1]) for s in stages)
    with pytest.raises(ValueError, match="needs 90 training images; there are 60"):
        rotation_stream(train_set, test_set, [0.0, 1.0, 2.0], seed=0, stage_train_size=30)


# -- the command line -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--methods", "lora-merge,lora-magic"], "unknown methods ['lora-magic']"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--seeds", "1,1"], "--seeds must be distinct"),
    (["--digit-stages", "11"], "--digit-stages must be between 1 and 10, got 11"),
    (["--replay", "-1"], "--replay must be >= 0"),
])
def test_cli_rejects_bad_options_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    code = cli_main(["run", "digit-stream", *argv, "--out", str(out)])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [(["--stream", "spiral"], "invalid choice: 'spiral'"),
                                          (["--angles", "0,forty"], "comma-separated list of float")])
def test_cli_parser_rejects_malformed_flags(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "digit-stream", *argv, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_refuses_cells_made_with_other_options(tmp_path, capsys):
    out = tmp_path / "o"
    other = DigitStreamConfig(steps=7)
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "lora-merge-seed0.json").write_text(json.dumps({"protocol": other.protocol(), "row": {}}))
    code = cli_main(["run", "digit-stream", "--resume", "--seeds", "0", "--methods", "lora-merge", "--out", str(out)])
    assert code == 1
    assert f"steps=7 (now {DigitStreamConfig().steps})" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == ["cells", "lora-merge-seed0.json"]  # nothing written


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "digit-stream", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--stream", "--angles", "--methods", "--seeds", "--steps", "--rank", "--lr", "--full-lr", "--replay",
                 "--kl-weight", "--test-size", "--threads", "--resume", "--out"):
        assert flag in text
