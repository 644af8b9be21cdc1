"""Every refusal names what is wrong and what would be right, and leaves the model exactly as it was
(tensors, module types, requires_grad flags, lorakit attributes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from conftest import FACTORIES, assert_same_state, lorakit_leftovers, perturb_adapters, state_snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

linear_net = FACTORIES["linear"]


def saved_adapter(directory: Path, model=None, **cfg) -> Path:
    """A perturbed LinearNet adapter on layer + head, saved to ``directory``."""
    model = model or linear_net()
    lk.save_adapter(lk.inject(model, lk.LoRAConfig(**{"rank": 2, "targets": ["layer", "head"], **cfg})), directory)
    return directory


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class WithGroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)  # wrapped before the grouped conv is reached
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)


class OtherNames(nn.Module):
    """Has ``layer`` but not ``head``."""

    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        self.layer = nn.Linear(6, hidden)
        self.out = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.layer(x)))


# -- changing a saved adapter folder (each returns the folder) ------------------------------------------
def _edited(directory: Path, **changes) -> Path:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def _deleted(directory: Path, filename: str) -> Path:
    (directory / filename).unlink()
    return directory


def _drop_tensor(directory: Path, key: str) -> Path:
    tensors = load_file(directory / "adapter_model.safetensors")
    del tensors[key]
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


def _truncated(directory: Path) -> Path:
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return directory


def _corrupt_json(directory: Path) -> Path:
    path = directory / "adapter_config.json"
    path.write_text(path.read_text()[:-10])
    return directory


def _replaced_json(directory: Path, obj) -> Path:
    (directory / "adapter_config.json").write_text(json.dumps(obj))
    return directory


# -- the actions that must fail: each returns (model, action) -------------------------------------------
def _inject(model, name="default", **cfg):
    return model, lambda: lk.inject(model, lk.LoRAConfig(**cfg), name=name)  # the config is built inside


def _call(model, function, *args, **kwargs):
    return model, lambda: function(model, *args, **kwargs)


def _load(model, directory, name="default"):
    return model, lambda: lk.load_adapter(model, directory, name=name)


def _with_adapter(model, name="default", **cfg):
    lk.inject(model, lk.LoRAConfig(**{"rank": 2, "targets": ["layer"], **cfg}), name=name)
    perturb_adapters(model)
    return model


def _adapted():
    return _with_adapter(linear_net())


# (id, build(tmp_path) -> (model, action), exception, regex the message must match)
SCENARIOS = [
    # -- inject and the adapter API -----------------------------------------------------------------
    ("targets-match-nothing", lambda tmp: _inject(linear_net(), targets=["q_proj"]), ValueError,
     r"\['q_proj'\] match no supported module; modules that exist include: layer, head"),
    ("regex-matches-nothing", lambda tmp: _inject(linear_net(), targets=r"encoder\..*"), ValueError,
     r"match no supported module; modules that exist include: layer, head"),
    ("rank-zero", lambda tmp: _inject(linear_net(), rank=0), ValueError, r"rank=0 is out of range; expected an integer >= 1"),
    ("rank-float", lambda tmp: _inject(linear_net(), rank=2.5), TypeError, r"rank=2.5 is not an integer; expected an integer >= 1"),
    ("dropout-one", lambda tmp: _inject(linear_net(), dropout=1.0), ValueError,
     r"dropout=1.0 is out of range; expected a finite number in \[0, 1\)"),
    ("dropout-negative", lambda tmp: _inject(linear_net(), dropout=-0.1), ValueError, r"dropout=-0.1 is out of range"),
    ("unknown-init", lambda tmp: _inject(linear_net(), init="xavier"), ValueError,
     r"init='xavier' is not supported; choose one of \['gaussian', 'kaiming', 'svd'\]"),
    ("unknown-mode", lambda tmp: _inject(linear_net(), mode="fused"), ValueError,
     r"mode='fused'.*'module', 'parametrize'"),
    ("layernorm-named-explicitly", lambda tmp: _inject(WithNorm(), targets=["layer", "norm"]), ValueError,
     r"'norm' is a LayerNorm, which this method cannot adapt; supported: nn.Linear, .*Embedding"),
    ("svd-on-conv", lambda tmp: _inject(FACTORIES["conv2d"](), targets=["layer", "head"], init="svd"), ValueError,
     r"init='svd' supports Linear and Conv1D layers only; 'layer' is not one"),
    ("svd-on-embedding", lambda tmp: _inject(FACTORIES["embedding"](), targets=["head", "layer"], init="svd"),
     ValueError, r"init='svd' supports Linear and Conv1D.*'layer'"),
    ("svd-rank-above-layer-size", lambda tmp: _inject(linear_net(), targets=["layer", "head"], rank=4, init="svd"),
     ValueError, r"init='svd' needs rank <= min\(in, out\); layer 'head' allows at most 3, got rank=4"),
    ("svd-in-parametrize-mode", lambda tmp: _inject(linear_net(), init="svd", mode="parametrize"), ValueError,
     r"init='svd' is available in mode='module'; use 'kaiming' or 'gaussian'"),
    ("grouped-conv", lambda tmp: _inject(WithGroupedConv()), ValueError, r"grouped convolutions.*groups=2.*groups=1"),
    ("modules-to-save-match-nothing",
     lambda tmp: _inject(linear_net(), targets=["layer"], modules_to_save=["classifier"]), ValueError,
     r"modules_to_save=\['classifier'\] match no module; modules that exist include: layer"),
    ("adapter-name-with-dot", lambda tmp: _inject(linear_net(), name="a.b"), ValueError,
     r"adapter name must be a non-empty string without dots, got 'a.b'"),
    ("duplicate-adapter-name", lambda tmp: _inject(_adapted(), targets=["head"]), ValueError,
     r"already has an adapter named 'default'; pick another name or delete_adapter"),
    ("set-active-unknown", lambda tmp: _call(_adapted(), lk.set_active, "nope"), KeyError,
     r"no adapter named 'nope'; the model has: \['default'\]"),
    ("delete-unknown", lambda tmp: _call(_adapted(), lk.delete_adapter, "nope"), KeyError, r"no adapter named 'nope'"),
    ("set-active-plain-model", lambda tmp: _call(linear_net(), lk.set_active, "default"), KeyError,
     r"no adapter named 'default'; the model has: none \(call lorakit.inject first\)"),
    ("save-unknown", lambda tmp: _call(_adapted(), lk.save_adapter, tmp / "out", name="nope"), KeyError,
     r"no adapter named 'nope' to save; the model has: \['default'\]"),
    # -- load_adapter: the adapter does not fit the model -------------------------------------------
    ("shapes-do-not-fit",
     lambda tmp: _load(OtherNames(hidden=8), saved_adapter(tmp, OtherNames(), targets=["layer", "out"])), ValueError,
     r"does not fit layer 'layer': base_model.model.layer.lora_B.weight has shape \(5, 2\), the model needs \(8, 2\)"),
    ("rank-differs-from-existing-adapter",
     lambda tmp: _load(_with_adapter(linear_net(), rank=4, targets=["layer", "head"]), saved_adapter(tmp)), ValueError,
     r"does not fit layer '(layer|head)': .* has shape \(2, \d\), the model needs \(4, \d\)"),
    ("scale-differs-from-existing-adapter",
     lambda tmp: _load(_with_adapter(linear_net(), targets=["layer", "head"], alpha=2.0), saved_adapter(tmp, alpha=8.0)),
     ValueError, r"adapter 'default' in the model has scale 1 at 'layer' but .* needs 4 there \(r=2, lora_alpha=8.0, use_rslora=False\); "
                 r"delete_adapter\(model, 'default'\) first or load it under another name"),
    ("file-targets-a-layer-the-model-lacks", lambda tmp: _load(OtherNames(), saved_adapter(tmp)), ValueError,
     r"tensor 'base_model.model.head.lora_A.weight' names layer 'head', which the config does not target"),
    ("file-targets-nothing-here", lambda tmp: _load(WithNorm(), saved_adapter(tmp, targets=["head"])), ValueError,
     r"does not fit this model: targets=\['head'\] match no supported module; modules that exist include: layer"),
    ("modules-to-save-undone-after-failed-load",
     lambda tmp: _load(OtherNames(hidden=8), saved_adapter(tmp, OtherNames(), targets=["layer"], modules_to_save=["out"])),
     ValueError, r"does not fit layer 'layer'"),
    ("modules-to-save-missing-in-model",
     lambda tmp: _load(WithNorm(), saved_adapter(tmp, OtherNames(), targets=["layer"], modules_to_save=["out"])),
     ValueError, r"modules_to_save=\['out'\] match no module; modules that exist include: layer, norm"),
    ("load-beside-another-adapter", lambda tmp: _load(_with_adapter(OtherNames(), name="other"), saved_adapter(tmp)),
     ValueError, r"names layer 'head', which the config does not target"),
    # -- load_adapter: the folder is broken ---------------------------------------------------------
    ("missing-config", lambda tmp: _load(linear_net(), _deleted(saved_adapter(tmp), "adapter_config.json")), ValueError,
     r"adapter_config.json does not exist; an adapter folder holds adapter_config.json and adapter_model.safetensors"),
    ("missing-weights", lambda tmp: _load(linear_net(), _deleted(saved_adapter(tmp), "adapter_model.safetensors")),
     ValueError, r"has no adapter_model.safetensors \(nor a PEFT adapter_model.bin\); is this an adapter folder\?"),
    ("missing-tensor",
     lambda tmp: _load(linear_net(), _drop_tensor(saved_adapter(tmp), "base_model.model.head.lora_B.weight")),
     ValueError, r"has no tensor 'base_model.model.head.lora_B.weight' for layer 'head'"),
    ("truncated-safetensors", lambda tmp: _load(linear_net(), _truncated(saved_adapter(tmp))), ValueError,
     r"adapter_model.safetensors is not a readable safetensors file \(truncated or corrupted\?\)"),
    ("corrupted-json", lambda tmp: _load(linear_net(), _corrupt_json(saved_adapter(tmp))), ValueError,
     r"adapter_config.json is not valid JSON \(truncated or corrupted\?\)"),
    ("json-without-peft-type", lambda tmp: _load(linear_net(), _replaced_json(saved_adapter(tmp), {"r": 2})),
     ValueError, r"has no 'peft_type'; expected a PEFT adapter config"),
    ("dora-without-magnitude", lambda tmp: _load(linear_net(), _edited(saved_adapter(tmp), use_dora=True)),
     ValueError, r"has no tensor 'base_model.model.head.lora_magnitude_vector' for layer 'head'"),
    ("dora-with-pissa", lambda tmp: _load(linear_net(), _edited(saved_adapter(tmp), use_dora=True,
                                                                 init_lora_weights="pissa")),
     ValueError, r"dora=True with init='svd' is not supported"),
    ("rank-pattern-out-of-range", lambda tmp: _load(linear_net(), _edited(saved_adapter(tmp), rank_pattern={"head": 0})),
     ValueError, r"rank_pattern\['head'\]=0 is out of range; expected an integer >= 1"),
    ("other-peft-type", lambda tmp: _load(linear_net(), _edited(saved_adapter(tmp), peft_type="IA3")), ValueError,
     r"peft_type='IA3' is not one lorakit loads; expected one of \['LORA'"),
    ("invalid-rank-in-file", lambda tmp: _load(linear_net(), _edited(saved_adapter(tmp), r=0)), ValueError,
     r"adapter_config.json: r=0 is out of range; expected an integer >= 1"),
]


@pytest.mark.parametrize("scenario_id, build, error, message", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_refusal_names_the_problem_and_changes_nothing(scenario_id, build, error, message, tmp_path):
    model, action = build(tmp_path)
    before = state_snapshot(model)
    with pytest.raises(error, match=message):
        action()
    assert_same_state(model, before)


def test_plain_model_stays_plain_after_failed_load(tmp_path):
    model = OtherNames()
    with pytest.raises(ValueError):
        lk.load_adapter(model, saved_adapter(tmp_path))
    assert lorakit_leftovers(model) == []


def test_failed_load_keeps_the_other_adapter_working(tmp_path):
    model = _with_adapter(OtherNames(), name="other")
    x = torch.randn(3, 6)
    y = model(x)
    with pytest.raises(ValueError):
        lk.load_adapter(model, saved_adapter(tmp_path))
    assert model.lorakit_active == "other" and list(model.lorakit_configs) == ["other"]
    assert torch.equal(model(x), y)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"layer.lora_A.other.weight",
                                                                         "layer.lora_B.other.weight"}


def test_unknown_config_keys_warn_when_empty_and_refuse_when_set(tmp_path):
    """A key lorakit does not know may be a newer PEFT's option that changes the outputs (aLoRA was one): set, it is
    refused; empty (null, false, {}, []), it cannot change anything and is only reported."""
    source = lk.inject(linear_net(), lk.LoRAConfig(rank=2, targets=["layer", "head"]))
    perturb_adapters(source)
    lk.save_adapter(source, tmp_path)
    _edited(tmp_path, shiny_new_option=None, another=False)
    x = source.layer.base_layer.weight.new_ones(2, 6)
    with pytest.warns(UserWarning, match=r"ignoring keys lorakit does not know: \['another', 'shiny_new_option'\]"):
        model = lk.load_adapter(linear_net(), tmp_path)
    torch.testing.assert_close(model(x), source(x))
    _edited(tmp_path, shiny_new_option=3)
    model = linear_net()
    before = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match=r"shiny_new_option=3 is a setting lorakit does not know"):
        lk.load_adapter(model, tmp_path)
    assert_same_state(model, before)


def test_error_message_lists_existing_modules_on_a_larger_model():
    """More than a dozen candidates: the list is cut with '...' but still shows real names."""
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(20)])
    with pytest.raises(ValueError, match=r"modules that exist include: 0, 1, 2, .*11, \.\.\.$"):
        lk.inject(model, lk.LoRAConfig(targets=["q_proj"]))
    assert lorakit_leftovers(model) == []
