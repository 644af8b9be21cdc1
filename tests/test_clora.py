"""C-LoRA decaying layers: the schedule, the noise statistics, and the layer invariants."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.compress.schedule import decay_factor
from lorakit.layers.clora import NOISE_OFF_BELOW, CLoRALayer
from lorakit.models import fmnist_mlp, vgg_small


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest (conftest.py)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fmnist_mlp(hidden1=32, hidden2=16)


# -- the schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step, expected", [(0, 1.0), (5, 1.0), (25, 0.75), (45, 0.5), (65, 0.25), (85, 0.0),
                                            (100, 0.0)])
def test_decay_factor_at_key_steps(step, expected):
    # T = 100, start 5 %, end 85 %: 1 until step 5, linear over 80 steps, 0 from step 85 on.
    assert decay_factor(step, 100, 0.05, 0.85) == pytest.approx(expected)


def test_decay_factor_with_floor_and_instant_drop():
    assert decay_factor(45, 100, 0.05, 0.85, floor=0.2) == pytest.approx(0.6)
    assert decay_factor(100, 100, 0.05, 0.85, floor=0.2) == pytest.approx(0.2)
    assert decay_factor(49, 100, 0.5, 0.5) == 1.0 and decay_factor(51, 100, 0.5, 0.5) == 0.0


def test_schedule_writes_d_into_every_layer_and_finishes():
    model = lk.inject(mlp(), lk.CLoRAConfig(rank=4, targets=["fc1", "fc2"], decay_start=0.1, decay_end=0.5))
    schedule = lk.DecaySchedule(model, 20)
    layers = [model.fc1, model.fc2]
    assert all(float(m.decay) == 1.0 for m in layers) and not schedule.finished()
    values = [schedule.step() for _ in range(20)]
    assert values[1] == 1.0 and values[5] == pytest.approx(0.5) and values[9] == 0.0  # steps 2, 6, 10
    assert all(float(m.decay) == 0.0 for m in layers) and schedule.finished()
    restored = lk.DecaySchedule(model, 20)
    restored.load_state_dict({"last_step": 6, "total_steps": 20})
    assert float(model.fc1.decay) == pytest.approx(0.5)


def test_schedule_needs_clora_layers():
    with pytest.raises(ValueError, match="no C-LoRA layers"):
        lk.DecaySchedule(mlp(), 10)
    with pytest.raises(ValueError, match="total_steps"):
        lk.DecaySchedule(lk.inject(mlp(), lk.CLoRAConfig(rank=4, targets=["fc1"])), 0)


# -- noise ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [0.8, 0.5])
def test_dense_noise_mean_and_variance_per_output_unit(d):
    torch.manual_seed(0)
    base = nn.Linear(100, 8)
    with torch.no_grad():  # rows with clearly different means and spreads
        base.weight.mul_(torch.linspace(0.5, 3.0, 8)[:, None]).add_(torch.linspace(-1, 1, 8)[:, None])
    layer = CLoRALayer(base)
    layer.add_adapter("default", lk.CLoRAConfig(rank=2, noise="always"))
    layer.decay.fill_(d)
    samples = torch.stack([layer.sample_noise() for _ in range(400)])  # (400, out, in)
    rows = samples.transpose(0, 1).reshape(8, -1)  # 40,000 draws per output unit
    m, sigma = base.weight.mean(1), base.weight.std(1)
    n = rows.shape[1]
    expected_mean, expected_var = (1 - d) * m, (1 - d * d) * sigma ** 2
    standard_error = (expected_var / n).sqrt()
    assert ((rows.mean(1) - expected_mean).abs() < 5 * standard_error).all()
    assert ((rows.var(1) / expected_var - 1).abs() < 5 * math.sqrt(2 / n)).all()


def test_conv_noise_is_per_tensor():
    torch.manual_seed(1)
    base = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        base.weight.add_(0.3)
    layer = CLoRALayer(base)
    layer.add_adapter("default", lk.CLoRAConfig(rank=2, noise="always"))
    layer.decay.fill_(0.5)
    draws = torch.stack([layer.sample_noise() for _ in range(200)]).flatten()
    n, var = draws.numel(), 0.75 * base.weight.var()
    assert abs(draws.mean() - 0.5 * base.weight.mean()) < 5 * (var / n).sqrt()
    assert abs(draws.var() / var - 1) < 5 * math.sqrt(2 / n)


def test_noise_only_in_training_and_only_while_scheduled():
    model = lk.inject(mlp(), lk.CLoRAConfig(rank=4, targets=["fc1", "fc2"], noise="scheduled"))
    x = torch.randn(5, 784)
    for layer in (model.fc1, model.fc2):
        layer.decay.fill_(0.5)
    model.train()
    assert not torch.equal(model(x), model(x))  # fresh noise each training forward
    model.eval()
    assert torch.equal(model(x), model(x))  # nothing random in eval
    model.train()
    for layer in (model.fc1, model.fc2):
        layer.decay.fill_(NOISE_OFF_BELOW - 0.01)
    assert torch.equal(model(x), model(x))  # scheduled noise is off below 0.3
    always = lk.inject(mlp(), lk.CLoRAConfig(rank=4, targets=["fc1"], noise="always")).train()
    always.fc1.decay.fill_(0.1)
    assert not torch.equal(always(x), always(x))
    none = lk.inject(mlp(), lk.CLoRAConfig(rank=4, targets=["fc1"], noise="none")).train()
    none.fc1.decay.fill_(0.5)
    assert torch.equal(none(x), none(x))


# -- layer invariants -----------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["random", "svd"])
def test_output_unchanged_at_start_and_disabled_is_base(init):
    model = mlp()
    x = torch.randn(6, 784)
    expected = model(x)
    lk.inject(model, lk.CLoRAConfig(rank=4, targets=["fc1", "fc2"], init=init))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with lk.disabled(model):
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    lk.delete_adapter(model, "default")
    assert isinstance(model.fc1, nn.Linear)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_only_factors_and_head_train():
    model = lk.inject(mlp(), lk.CLoRAConfig(rank=4, targets=["fc1", "fc2"], modules_to_save=["fc3"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.lora_A.default.weight", "fc1.lora_B.default.weight", "fc1.lora_C.default",
                         "fc2.lora_A.default.weight", "fc2.lora_B.default.weight", "fc2.lora_C.default",
                         "fc3.modules_to_save.default.weight", "fc3.modules_to_save.default.bias"}


def test_bias_false_has_no_c_and_the_activation_stays_in_the_model():
    model = lk.inject(mlp(), lk.CLoRAConfig(rank=4, targets=["fc1", "fc2"], bias=False))
    assert len(model.fc1.lora_C) == 0
    assert isinstance(model.relu1, nn.ReLU) and isinstance(model.relu2, nn.ReLU)


def test_rank_too_large_and_merge_are_errors():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rank 16 >= min.*'fc2'.*no compression"):
        lk.inject(model, lk.CLoRAConfig(rank=16, targets=["fc1", "fc2"]))  # fc1 fits, fc2 (32 -> 16) does not
    assert isinstance(model.fc1, nn.Linear) and not hasattr(model, "lorakit_configs")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model = lk.inject(mlp(), lk.CLoRAConfig(rank=4, targets=["fc1"]))
    with pytest.raises(ValueError, match="compress"):
        lk.merge(model)


def test_conv_layer_trains_and_decays():
    torch.manual_seed(0)
    model = vgg_small(widths=(4, 8), hidden=16)
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    lk.inject(model, lk.CLoRAConfig(rank=2, targets=["features.conv1_2", "features.conv2_1", "features.conv2_2"]))
    torch.testing.assert_close(model(x), expected)
    assert model.features.conv2_2.lora_A["default"].weight.shape == (2, 8, 3, 3)
    assert model.features.conv2_2.lora_B["default"].weight.shape == (8, 2, 1, 1)


def test_svd_init_on_convs_keeps_the_output_at_start():
    """init='svd' puts the top singular vectors of each conv's flattened kernel into B A (C-LoRA, not LoRA)."""
    from lorakit.models import vgg_small

    torch.manual_seed(0)
    model = vgg_small().eval()
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    lk.inject(model, lk.CLoRAConfig(rank=4, targets=["conv1_2", "conv2_1"], init="svd"))
    model.eval()
    assert torch.allclose(model(x), before, atol=1e-5)
    assert type(model.get_submodule("features.conv1_2")).__name__ != "Conv2d"
