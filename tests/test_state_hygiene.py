"""State hygiene (issue 8, item 6): requires_grad, transactional C-LoRA entry points, one table of methods."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import assert_same_state, perturb_adapters, state_snapshot
from lorakit.inject import METHODS, adapter_layers
from lorakit.layers.clora import CLoRALayer
from lorakit.layers.lora import LoRAWrapper

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.second = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.second(self.norm(self.first(x)))))


def net():
    torch.manual_seed(0)
    return Net()


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


# -- requires_grad: lorakit switches only its own parameters ------------------------------------------
def _second_inject(model, tmp_path):
    lk.inject(model, lk.LoRAConfig(rank=1, targets=["second"]), name="b")


def _set_active(model, tmp_path):
    lk.inject(model, lk.LoRAConfig(rank=1, targets=["second"]), name="b")
    lk.set_active(model, "a")


def _delete(model, tmp_path):
    lk.inject(model, lk.LoRAConfig(rank=1, targets=["second"]), name="b")
    lk.delete_adapter(model, "b")


def _load(model, tmp_path):
    lk.save_adapter(model, tmp_path)
    lk.load_adapter(model, tmp_path, name="c")


def _load_same_name(model, tmp_path):
    lk.save_adapter(model, tmp_path)
    lk.load_adapter(model, tmp_path, name="a")


def _failed_inject(model, tmp_path):
    with pytest.raises(ValueError):
        lk.inject(model, lk.LoRAConfig(rank=1, targets=["nothing_here"]), name="b")


@pytest.mark.parametrize("operation", [_second_inject, _set_active, _delete, _load, _load_same_name, _failed_inject])
def test_user_unfrozen_parameters_stay_trainable(operation, tmp_path):
    model = lk.inject(net(), lk.LoRAConfig(rank=2, targets=["first"]), name="a")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # base frozen once
    model.norm.requires_grad_(True)  # the user also trains the LayerNorm
    operation(model, tmp_path)
    assert model.norm.weight.requires_grad and model.norm.bias.requires_grad
    active = model.lorakit_active
    for name, p in model.named_parameters():
        if "lora_" in name:  # the active adapter's factors train, the others' do not
            assert p.requires_grad == (f".{active}." in name), name
        elif not name.startswith("norm."):
            assert not p.requires_grad, name


# -- C-LoRA is transactional --------------------------------------------------------------------------
def test_failing_clora_inject_leaves_no_orphan_adapter():
    model = lk.inject(net(), lk.CLoRAConfig(rank=2, targets=["second"]), name="a")
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="'second' already holds C-LoRA adapter 'a'"):
        lk.inject(model, lk.CLoRAConfig(rank=2, targets=["first", "second"]), name="b")
    assert_same_state(model, before)
    assert all(layer.adapter_names == ["a"] for _, layer in adapter_layers(model))


@pytest.mark.parametrize("cfg", [lk.LoRAConfig(rank=2, targets=["first", "second"]),
                                 lk.CLoRAConfig(rank=2, targets=["first", "second"])], ids=["lora", "clora"])
def test_an_error_while_adding_rolls_everything_back(cfg, monkeypatch):
    model = lk.inject(net(), lk.LoRAConfig(rank=1, targets=["head"]), name="a")
    model.norm.requires_grad_(True)
    before = state_snapshot(model)
    calls = []
    cls = CLoRALayer if isinstance(cfg, lk.CLoRAConfig) else LoRAWrapper
    original = cls.add_adapter

    def flaky(self, name, config):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        original(self, name, config)

    monkeypatch.setattr(cls, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        lk.inject(model, cfg, name="b")
    assert len(calls) == 2
    assert_same_state(model, before)


def mixed():
    """C-LoRA on ``first`` (earlier in the model), LoRA on ``head`` (later): unload visits head first."""
    model = lk.inject(net(), lk.LoRAConfig(rank=2, targets=["head"]), name="lora")
    lk.inject(model, lk.CLoRAConfig(rank=2, targets=["first"]), name="clora")
    perturb_adapters(model)
    return model


def test_unload_with_active_clora_refuses_before_changing_anything():
    model = mixed()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="'first': C-LoRA layers do not merge"):
        lk.unload(model, merge=True)
    assert_same_state(model, before)
    with pytest.raises(ValueError, match="C-LoRA layers do not merge"):
        lk.merge(model)
    assert_same_state(model, before)


def test_unload_with_inactive_clora_gives_the_lora_model():
    model = mixed()
    lk.set_active(model, "lora")
    expected = model(X).detach()
    plain = lk.unload(model, merge=True)
    assert not adapter_layers(plain) and type(plain.first) is nn.Linear
    torch.testing.assert_close(plain(X), expected, atol=1e-5, rtol=1e-5)


def test_compress_is_transactional(monkeypatch):
    model = lk.inject(net(), lk.CLoRAConfig(rank=2, targets=["first", "second", "head"]))
    for _, layer in adapter_layers(model):
        layer.decay.fill_(0.0)
    before = state_snapshot(model)
    calls = []
    original = CLoRALayer.to_low_rank

    def flaky(self):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("simulated")
        return original(self)

    monkeypatch.setattr(CLoRALayer, "to_low_rank", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        lk.compress(model)
    assert_same_state(model, before)


# -- one table of methods -----------------------------------------------------------------------------
def test_every_method_is_in_the_one_table():
    assert set(METHODS) == {lk.LoRAConfig, lk.AdapterConfig, lk.PromptConfig, lk.CLoRAConfig}
    import lorakit.compress as compress_package
    import lorakit.inject as inject_module  # noqa: F401  (the module, for the attribute check below)

    module = __import__("sys").modules["lorakit.inject"]
    assert not hasattr(module, "WRAPPERS") and not hasattr(module, "_INJECTORS")
    assert "_inject" not in vars(compress_package)  # compress no longer reaches into inject's internals


def test_an_unknown_config_is_refused_by_name():
    model = net()
    before = state_snapshot(model)
    with pytest.raises(TypeError, match="inject takes one of .*LoRAConfig.*got dict"):
        lk.inject(model, {"rank": 2})
    assert_same_state(model, before)
