"""Adapter checkpoints: PEFT's file layout and key names, and atomic writes (old file or new, never half)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit import _io
from conftest import FACTORIES, assert_same_state, perturb_adapters, state_snapshot

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


# -- loading into a merged adapter ----------------------------------------------------------------------
def base_weight(model, mode):
    return model.layer.base_layer.weight if mode == "module" else model.layer.parametrizations.weight.original


@pytest.mark.parametrize("mode", ["module", "parametrize"])
def test_load_into_a_merged_adapter_unmerges_first_and_merges_the_new_values(mode, tmp_path):
    """Before: the factors were overwritten while merged, so unmerge subtracted the wrong delta (max |W-W0| 1.12)."""
    source = adapted(seed=1, mode=mode)
    lk.save_adapter(source, tmp_path)
    x = FACTORIES["linear"]().example_input()
    model = adapted(seed=2, mode=mode)  # the same config, other values
    w0 = base_weight(model, mode).detach().clone()
    lk.merge(model)
    lk.load_adapter(model, tmp_path)
    assert (model.layer.merged_adapter == "default") if mode == "module" else \
        model.layer.parametrizations.weight[0].merged
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=1e-5)
        lk.unmerge(model)
        assert (base_weight(model, mode) - w0).abs().max() < 1e-6
        torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=1e-5)


def test_failed_load_into_a_merged_adapter_changes_nothing(tmp_path):
    lk.save_adapter(adapted(seed=1), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.head.lora_B.weight"][0, 0] = float("inf")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = adapted(seed=2)
    lk.merge(model)
    before = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match="non-finite"):
        lk.load_adapter(model, tmp_path)
    assert_same_state(model, before)


# -- wrapped models: DDP, FSDP2 (fully_shard), torch.compile; a 1-process gloo group ----------------------
@contextlib.contextmanager
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model, kind):
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if kind == "compile":
        torch._dynamo.reset()
        return torch.compile(model, backend="eager")
    from torch.distributed.fsdp import fully_shard
    fully_shard(model.layer)
    fully_shard(model)
    return model


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "compile"])
def test_wrapped_model_saves_the_plain_models_file_and_loads_through_the_wrapper(kind, tmp_path):
    settings = dict(targets=["layer"], modules_to_save=["head"])
    x = FACTORIES["linear"]().example_input()
    plain = adapted(seed=1, **settings)
    with torch.no_grad():
        expected = plain(x)
    lk.save_adapter(plain, tmp_path / "plain")
    with process_group():
        model = adapted(seed=1, **settings)
        wrapped = wrap(model, kind)
        if kind == "fsdp2":
            from torch.distributed.tensor import DTensor
            assert isinstance(model.layer.lora_A["default"].weight, DTensor)
        lk.save_adapter(wrapped, tmp_path / "wrapped")
        theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "wrapped"))
        assert list(ours) == list(theirs) and not any("module." in k or "_orig_mod" in k for k in ours)
        assert all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in theirs)
        assert (tmp_path / "wrapped" / "adapter_config.json").read_text() == \
            (tmp_path / "plain" / "adapter_config.json").read_text()

        other = adapted(seed=2, **settings)  # the same adapter with other values, loaded into through the wrapper
        wrapped = wrap(other, kind)
        assert lk.load_adapter(wrapped, tmp_path / "plain") is wrapped
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), expected, atol=1e-6, rtol=1e-5)


def test_with_a_process_group_a_failed_write_raises(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io, "save_tensors", full_disk)
    with process_group():
        with pytest.raises(OSError, match="No space left"):
            lk.save_adapter(adapted(), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


@pytest.mark.parametrize("is_main_process, written", [(None, True), (True, True), (False, False)])
def test_is_main_process_decides_who_writes_as_in_peft(is_main_process, written, tmp_path):
    """PEFT's ``save_pretrained(is_main_process=...)``: None = rank 0 of the group writes (here the only rank)."""
    with process_group():
        lk.save_adapter(adapted(seed=1), tmp_path / "out", is_main_process=is_main_process)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() == written
    assert (tmp_path / "out" / "adapter_config.json").is_file() == written
