"""C-LoRA -> low-rank layers: equal outputs, fewer parameters, smaller files, and refusal before the floor."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit._io import save_tensors
from lorakit.layers.lowrank import LowRankConv2d, LowRankLinear
from lorakit.models import fmnist_mlp, vgg_small
from lorakit.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest (conftest.py)


def trained(model: nn.Module, cfg: lk.CLoRAConfig, data, steps: int = 12) -> nn.Module:
    lk.inject(model, cfg)
    schedule = lk.DecaySchedule(model, steps)
    train(model, data, TrainConfig(batch_size=8, steps=steps, progress=False), on_step=lambda _: schedule.step())
    return model


def mlp_case():
    torch.manual_seed(0)
    model = fmnist_mlp(hidden1=32, hidden2=16)
    data = (torch.rand(64, 784), torch.randint(0, 10, (64,)))
    return model, ["fc1", "fc2"], data


def conv_case():
    torch.manual_seed(0)
    model = vgg_small(widths=(4, 8), hidden=16)
    data = (torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    return model, ["features.conv1_2", "features.conv2_1", "features.conv2_2", "classifier.fc1"], data


def bert_case():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=40, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    data = (torch.randint(0, 50, (16, 8)), torch.randint(0, 3, (16,)))
    return model, ["query", "key", "value", "attention.output.dense"], data


CASES = {"mlp": mlp_case, "conv": conv_case, "bert": bert_case}
VARIANTS = [dict(noise="scheduled", bias=True, init="random"), dict(noise="none", bias=False, init="random"),
            dict(noise="always", bias=True, init="svd")]


def logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_compress_equals_the_trained_model_and_shrinks_it(case, variant, tmp_path):
    model, targets, data = CASES[case]()
    kwargs = VARIANTS[variant]
    if case == "conv" and kwargs["init"] == "svd":
        kwargs = {**kwargs, "targets": ["classifier.fc1"]}  # lorakit.inject allows init='svd' on Linear layers only
    cfg = lk.CLoRAConfig(rank=2, alpha=4, **{"targets": targets, **kwargs})
    dense_bytes = save_tensors(tmp_path / "dense.safetensors", model.state_dict()).stat().st_size
    dense_count = sum(p.numel() for p in model.parameters())
    trained(model, cfg, data)
    model.eval()
    x = data[0][:5]
    expected = logits(model, x)
    lk.compress(model)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-5)
    kinds = {type(m) for m in model.modules()}
    assert kinds & {LowRankLinear, LowRankConv2d} and not any("CLoRA" in k.__name__ for k in kinds)
    low = [m for m in model.modules() if isinstance(m, (LowRankLinear, LowRankConv2d))]
    assert len(low) == (4 if case == "bert" else len(cfg.targets))
    # every target had W and a bias; each now holds A, B and (with bias=True) C
    out = lambda m: m.B.shape[0]  # noqa: E731
    expected_count = dense_count - sum(m.weight().numel() + out(m) for m in low)
    expected_count += sum(m.A.numel() + m.B.numel() + (out(m) if cfg.bias else 0) for m in low)
    assert sum(p.numel() for p in model.parameters()) == expected_count
    compressed_bytes = save_tensors(tmp_path / "low.safetensors", model.state_dict()).stat().st_size
    assert compressed_bytes < dense_bytes


def test_compress_refuses_before_the_floor_and_changes_nothing():
    model, targets, data = mlp_case()
    lk.inject(model, lk.CLoRAConfig(rank=2, targets=targets))
    schedule = lk.DecaySchedule(model, 10)
    for _ in range(5):
        schedule.step()
    types = {n: type(m) for n, m in model.named_modules()}
    x = data[0][:3]
    expected = model.eval()(x)
    with pytest.raises(ValueError, match="has not finished.*fc1.*force=True"):
        lk.compress(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    lk.compress(model, force=True)
    assert isinstance(model.fc1, LowRankLinear)


def test_compress_needs_clora_layers():
    with pytest.raises(ValueError, match="no C-LoRA layers"):
        lk.compress(fmnist_mlp())


def test_compress_keeps_a_trained_head():
    model, targets, data = mlp_case()
    trained(model, lk.CLoRAConfig(rank=2, targets=targets, modules_to_save=["fc3"]), data)
    head = model.fc3.modules_to_save["default"]
    lk.compress(model)
    assert model.fc3 is head and not hasattr(model, "lorakit_configs")


def test_low_rank_conv_is_the_conv_with_kernel_b_a():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1)
    low = LowRankConv2d.from_factors(conv, torch.randn(2, 3, 3, 3), torch.randn(6, 2), torch.randn(6))
    x = torch.randn(2, 3, 9, 9)
    expected = nn.functional.conv2d(x, low.weight(), low.bias, stride=2, padding=1)
    torch.testing.assert_close(low(x), expected, atol=1e-5, rtol=1e-5)
