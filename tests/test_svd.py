"""Truncated and activation-aware SVD compression: exact errors, the seeds' demo, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.compress.svd import choose_rank, truncated_svd, whitened_svd
from lorakit.models import fmnist_mlp, vgg_small
from lorakit.train import TrainConfig, TrainingDivergedError, train


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest (conftest.py)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fmnist_mlp(hidden1=32, hidden2=16)


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict, types: dict) -> None:
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("shape, rank", [((20, 12), 3), ((12, 20), 5), ((30, 30), 1)])
def test_truncation_error_is_the_tail_of_the_singular_values(shape, rank):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    a, b = truncated_svd(w, rank)
    s = torch.linalg.svdvals(w)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank)
    torch.testing.assert_close(torch.linalg.norm(w - b @ a), s[rank:].pow(2).sum().sqrt())
    torch.testing.assert_close(torch.linalg.matrix_norm(w - b @ a, ord=2), s[rank])  # spectral: the next one


def test_reference_rank2_demo_is_exact_with_40_numbers():
    torch.manual_seed(0)
    layer = nn.Linear(10, 10)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(10, 2) @ torch.randn(2, 10))
    model = nn.Sequential(layer)
    x = torch.randn(4, 10)
    expected = model(x)
    lk.svd_compress(model, rank=2, targets=["0"])
    low = model[0]
    assert isinstance(low, lk.LowRankLinear)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.weight.numel() == 100 and low.A.numel() + low.B.numel() == 40


def test_activation_aware_beats_plain_on_the_calibration_data():
    torch.manual_seed(0)
    w = torch.randn(24, 16, dtype=torch.float64)
    mixing = torch.randn(16, 16, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    x = torch.randn(500, 16, dtype=torch.float64) @ mixing  # strongly correlated inputs
    gram = x.t() @ x
    for rank in (2, 4, 8):
        a, b = truncated_svd(w, rank)
        wa, wb = whitened_svd(w, gram, rank)
        plain = torch.linalg.norm((w - b @ a) @ x.t())
        aware = torch.linalg.norm((w - wb @ wa) @ x.t())
        # the optimum: tail of the singular values of W X^T
        best = torch.linalg.svdvals(w @ x.t())[rank:].pow(2).sum().sqrt()
        assert aware < 0.9 * plain
        torch.testing.assert_close(aware, best, rtol=1e-5, atol=1e-8)


def test_calibrated_model_compression_beats_plain_on_its_outputs():
    model = mlp()
    torch.manual_seed(1)
    x = torch.rand(256, 784) * (torch.rand(784) > 0.5)  # some pixels never light up
    calibration = [(x[i:i + 64], torch.zeros(64)) for i in range(0, 256, 64)]
    outputs = {}
    for name, kwargs in {"plain": {}, "aware": {"calibration": calibration}}.items():
        compressed = lk.svd_compress(copy.deepcopy(model), rank=4, targets=["fc1"], **kwargs)
        outputs[name] = torch.linalg.norm(compressed.fc1(x) - model.fc1(x))
    assert outputs["aware"] < outputs["plain"]


def test_energy_chooses_the_smallest_sufficient_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, 0.7) == 1 and choose_rank(s, 16 / 22) == 1
    assert choose_rank(s, 0.8) == 2 and choose_rank(s, 0.9) == 2 and choose_rank(s, 0.99) == 4
    assert choose_rank(s, 1.0) == 4
    model = mlp()
    lk.svd_compress(model, energy=0.5, targets=["fc1"])
    w = mlp().fc1.weight.detach()
    assert model.fc1.rank == choose_rank(torch.linalg.svdvals(w), 0.5)


def test_conv_svd_matches_the_truncated_kernel():
    torch.manual_seed(0)
    model = vgg_small(widths=(4, 8), hidden=16)
    conv = copy.deepcopy(model.features.conv2_2)
    lk.svd_compress(model, rank=3, targets=["features.conv2_2"])
    low = model.features.conv2_2
    assert isinstance(low, lk.LowRankConv2d)
    a, b = truncated_svd(conv.weight.detach().flatten(1), 3)
    x = torch.randn(2, 8, 7, 7)
    expected = nn.functional.conv2d(x, (b @ a).view_as(conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(low(x), expected, atol=1e-5, rtol=1e-4)
    calibration = [torch.randn(4, 1, 28, 28)]
    lk.svd_compress(model, rank=2, targets=["features.conv1_2"], calibration=calibration)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bert_attention_qkvo():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=40, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    targets = ["query", "key", "value", "attention.output.dense"]
    ids = torch.randint(0, 50, (2, 8))
    lk.svd_compress(model, rank=31, targets=targets, calibration=[{"input_ids": ids}])
    low = [n for n, m in model.named_modules() if isinstance(m, lk.LowRankLinear)]
    assert len(low) == 8 and model(input_ids=ids).last_hidden_state.shape == (2, 8, 32)


# -- bad input: a clear error, the model unchanged --------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 16, "targets": ["fc1", "fc2"]}, "no.*compress|would not compress"),  # fc2 is 32 -> 16
    ({"rank": 40, "targets": ["fc1"]}, "rank 40 >= min"),
    ({"energy": 0.0, "targets": ["fc1"]}, r"energy must be in \(0, 1\]"),
    ({"energy": 1.5, "targets": ["fc1"]}, r"energy must be in \(0, 1\]"),
    ({"targets": ["fc1"]}, "exactly one of rank"),
    ({"rank": 2, "energy": 0.9, "targets": ["fc1"]}, "exactly one of rank"),
    ({"rank": 2, "targets": ["fc9"]}, "match no supported module"),
    ({"rank": 2, "targets": ["fc1"], "calibration": [(torch.randn(4, 100),)]}, "calibration batch .* does not fit"),
    ({"rank": 2, "targets": ["fc1"], "calibration": []}, "no batches"),
])
def test_bad_input_is_an_error_and_changes_nothing(kwargs, message):
    model = mlp()
    before, types = state(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=message):
        lk.svd_compress(model, **kwargs)
    assert_unchanged(model, before, types)


def test_nan_during_finetune_stops_with_the_step_and_restores_the_model(tmp_path):
    model = mlp()
    before, types = state(model), {n: type(m) for n, m in model.named_modules()}
    data = (torch.randn(40, 784), torch.randint(0, 10, (40,)))
    calls = []

    def poisoned_loss(m, batch):
        calls.append(1)
        loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        return loss * float("nan") if len(calls) == 3 else loss

    checkpoint = tmp_path / "last.safetensors"
    cfg = TrainConfig(batch_size=10, steps=5, checkpoint=str(checkpoint), checkpoint_every=1, progress=False)

    def finetune(m, params):
        train(m, data, cfg, params=params, loss_fn=poisoned_loss)

    with pytest.raises(TrainingDivergedError, match="step 3") as err:
        lk.svd_compress(model, rank=4, targets=["fc1"], finetune=finetune)
    assert err.value.step == 3 and checkpoint.is_file()  # the step-2 weights are kept on disk
    assert_unchanged(model, before, types)
