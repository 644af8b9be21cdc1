"""Adapter checkpoints: PEFT's file layout and key names, and atomic writes (old file or new, never half)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lorakit as lk
from lorakit import _io
from conftest import FACTORIES, perturb_adapters

pytestmark = pytest.mark.usefixtures("single_thread")

FILES = ["adapter_config.json", "adapter_model.safetensors"]


def adapted(model_key="linear", seed=123, **cfg):
    model = lk.inject(FACTORIES[model_key](), lk.LoRAConfig(**{"rank": 2, "alpha": 4.0, "targets": ["layer", "head"], **cfg}))
    perturb_adapters(model, seed=seed)
    return model


# -- layout -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_key, expected", [
    ("linear", {"layer.lora_A.weight": (2, 6), "layer.lora_B.weight": (5, 2),
                "head.lora_A.weight": (2, 5), "head.lora_B.weight": (3, 2)}),
    ("conv2d", {"layer.lora_A.weight": (2, 3, 3, 3), "layer.lora_B.weight": (4, 2, 1, 1),
                "head.lora_A.weight": (2, 4, 2, 1), "head.lora_B.weight": (2, 2, 1, 1)}),
    ("embedding", {"layer.lora_embedding_A": (2, 10), "layer.lora_embedding_B": (6, 2),
                   "head.lora_A.weight": (2, 6), "head.lora_B.weight": (3, 2)}),
    ("hf_conv1d", {"layer.lora_A.weight": (2, 6), "layer.lora_B.weight": (5, 2),
                   "head.lora_A.weight": (2, 5), "head.lora_B.weight": (3, 2)}),
])
@pytest.mark.parametrize("mode", ["module", "parametrize"])
def test_peft_key_names_and_shapes(model_key, expected, mode, tmp_path):
    lk.save_adapter(adapted(model_key, mode=mode), tmp_path)
    assert sorted(os.listdir(tmp_path)) == FILES
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {f"base_model.model.{k}": v for k, v in expected.items()}
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4.0
    assert config["target_modules"] == ["head", "layer"] and config["use_rslora"] is False
    assert config["fan_in_fan_out"] is (model_key == "hf_conv1d")
    assert config.get("lorakit_mode", "module") == mode


def test_saved_values_are_the_factors(tmp_path):
    model = adapted()
    lk.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(tensors["base_model.model.layer.lora_A.weight"], model.layer.lora_A["default"].weight)
    assert torch.equal(tensors["base_model.model.head.lora_B.weight"], model.head.lora_B["default"].weight)


def test_modules_to_save_and_rslora_in_config(tmp_path):
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=4, targets=["layer"], rslora=True, modules_to_save=["head"]))
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and config["use_rslora"] is True and config["target_modules"] == ["layer"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {"base_model.model.layer.lora_A.weight", "base_model.model.layer.lora_B.weight",
                    "base_model.model.head.weight", "base_model.model.head.bias"}


def test_save_while_merged_saves_factors_and_round_trips(tmp_path):
    model = adapted()
    x = FACTORIES["linear"]().example_input()
    y = model(x)
    lk.merge(model)
    lk.save_adapter(model, tmp_path)
    assert model.layer.merged_adapter == "default", "saving does not unmerge"
    torch.testing.assert_close(lk.load_adapter(FACTORIES["linear"](), tmp_path)(x), y, atol=1e-6, rtol=1e-5)


def test_save_named_adapter_and_overwrite(tmp_path):
    model = adapted(seed=1)
    lk.inject(model, lk.LoRAConfig(rank=3, targets=["layer"]), name="second")
    lk.save_adapter(model, tmp_path, name="default")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    lk.save_adapter(model, tmp_path)  # the active one, "second", replaces it
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 3
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"base_model.model.layer.lora_A.weight",
                                                                       "base_model.model.layer.lora_B.weight"}
    assert sorted(os.listdir(tmp_path)) == FILES


def test_save_creates_missing_directories(tmp_path):
    lk.save_adapter(adapted(), tmp_path / "a" / "b")
    assert sorted(os.listdir(tmp_path / "a" / "b")) == FILES


# -- atomic writes ------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("error", [Crash, KeyboardInterrupt])
def test_crash_during_weights_write_keeps_old_file(error, tmp_path, monkeypatch):
    lk.save_adapter(adapted(seed=1), tmp_path)
    old = {name: (tmp_path / name).read_bytes() for name in FILES}

    real = _io.save_file

    def crashing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise error("disk full")

    monkeypatch.setattr(_io, "save_file", crashing)
    with pytest.raises(error):
        lk.save_adapter(adapted(seed=2), tmp_path)
    assert sorted(os.listdir(tmp_path)) == FILES, "no temporary file is left behind"
    assert {name: (tmp_path / name).read_bytes() for name in FILES} == old
    monkeypatch.undo()
    load_file(tmp_path / "adapter_model.safetensors")  # still a valid file


def test_crash_during_config_write_keeps_old_file(tmp_path, monkeypatch):
    lk.save_adapter(adapted(seed=1), tmp_path)
    old_config = (tmp_path / "adapter_config.json").read_bytes()
    real = Path.write_text

    def crashing(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise Crash("disk full")

    monkeypatch.setattr(Path, "write_text", crashing)
    with pytest.raises(Crash):
        lk.save_adapter(adapted(seed=2, rank=3), tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == FILES
    assert (tmp_path / "adapter_config.json").read_bytes() == old_config
    json.loads(old_config)


def test_atomic_write_replaces_in_one_step(tmp_path):
    target = tmp_path / "f.json"
    _io.write_json(target, {"a": 1})
    _io.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["f.json"]


def test_load_tensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        _io.load_tensors(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"junk.safetensors is not a readable safetensors file"):
        _io.load_tensors(tmp_path / "junk.safetensors")


class Nested(torch.nn.Module):
    """``layer`` at the top and ``block.layer`` below: a list ['layer'] would match both."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.block = torch.nn.Sequential()
        self.block.layer = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.block.layer(self.layer(x))


def seeded_nested():
    torch.manual_seed(0)
    return Nested()


def test_target_list_that_would_overmatch_is_saved_exactly(tmp_path):
    import peft

    model = lk.inject(seeded_nested(), lk.LoRAConfig(rank=2, targets="layer"))  # regex: the top one only
    perturb_adapters(model)
    x = torch.randn(3, 4)
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == "layer"
    loaded = lk.load_adapter(seeded_nested(), tmp_path)
    assert type(loaded.block.layer) is torch.nn.Linear
    torch.testing.assert_close(loaded(x), model(x))
    theirs = peft.PeftModel.from_pretrained(seeded_nested(), str(tmp_path))
    assert type(theirs.base_model.model.block.layer) is torch.nn.Linear
    torch.testing.assert_close(theirs(x), model(x))
