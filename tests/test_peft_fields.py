"""Checkpoints are never silently wrong (issue 8, item 5), as one table per direction.

PEFT -> lorakit: for every ``peft.LoraConfig`` field a user may set, a PEFT-written adapter with that field set
either loads into lorakit with PEFT's outputs (float32, <= 1e-5), or is refused with an ``AdapterLoadError`` that
names the setting, the model unchanged. A field the table does not list fails the test, so the table cannot fall
behind a new PEFT.

lorakit -> PEFT: for every ``LoRAConfig`` option (and the model properties PEFT computes differently), a
lorakit-written adapter either loads in PEFT with lorakit's outputs, or lorakit writes its own format
(``peft_type: LORAKIT_LORACONFIG``) that PEFT refuses and lorakit loads back with the same outputs.
"""
from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import BdLoraConfig, VeloraConfig
from torch import nn

import lorakit as lk
from conftest import FACTORIES, Conv2dNet, TokenNet, assert_same_state, perturb_adapters, seeded, state_snapshot

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]


class Blocks(nn.Module):
    """Two blocks in ``layers`` (for PEFT's layers_to_transform / layer_replication)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"layer": nn.Linear(6, 6)}) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.layers:
            x = torch.tanh(block["layer"](x))
        return self.head(x)

    def example_input(self):
        return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


class Nested(nn.Module):
    """Blocks one level down (``model.blocks.<i>.layer``), where PEFT finds the block index without layers_pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.blocks = Blocks().layers
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.model.blocks:
            x = torch.tanh(block["layer"](x))
        return self.head(x)

    def example_input(self):
        return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


LINEAR, BLOCKS, NESTED, TOKENS = FACTORIES["linear"], seeded(Blocks), seeded(Nested), seeded(TokenNet)
SAME, REFUSED = "same outputs", "refused"
BASE = dict(r=2, lora_alpha=4, target_modules=["layer", "head"])

# field -> [(value, expectation, how, factory, other LoraConfig settings)]
# how: "peft" builds the adapter with peft.get_peft_model; "json" writes the value into the file PEFT saved (for
# fields PEFT only acts on with models or libraries these tests do not have; the file is what lorakit reads).
CASES: dict[str, list[tuple]] = {
    "task_type": [("FEATURE_EXTRACTION", SAME, "json", LINEAR, {})],
    "auto_mapping": [({"base_model_class": "LinearNet", "parent_library": "tests"}, SAME, "json", LINEAR, {})],
    "peft_version": [("0.9.0", SAME, "json", LINEAR, {})],
    "base_model_name_or_path": [("some/model", SAME, "peft", LINEAR, {})],
    "revision": [("main", SAME, "peft", LINEAR, {})],
    "inference_mode": [(True, SAME, "peft", LINEAR, {})],
    "r": [(3, SAME, "peft", LINEAR, {})],
    "target_modules": [(r".*(layer|head)", SAME, "peft", LINEAR, {}), ("all-linear", SAME, "peft", LINEAR, {})],
    "exclude_modules": [(["head"], SAME, "peft", LINEAR, {})],
    "lora_alpha": [(7.5, SAME, "peft", LINEAR, {})],
    "lora_dropout": [(0.3, SAME, "peft", LINEAR, {})],
    "fan_in_fan_out": [(True, SAME, "peft", FACTORIES["hf_conv1d"], {})],
    "bias": [("all", SAME, "peft", LINEAR, {"target_modules": ["layer"]}),
             ("lora_only", SAME, "peft", LINEAR, {"target_modules": ["layer"]}),
             ("all", SAME, "peft", FACTORIES["conv2d"], {"lora_bias": True})],
    "use_rslora": [(True, SAME, "peft", LINEAR, {})],
    "modules_to_save": [(["head"], SAME, "peft", LINEAR, {"target_modules": ["layer"]})],
    "init_lora_weights": [(False, SAME, "peft", LINEAR, {}), ("gaussian", SAME, "peft", LINEAR, {}),
                          ("orthogonal", SAME, "peft", LINEAR, {}), ("mica", SAME, "peft", LINEAR, {}),
                          ("eva", SAME, "json", LINEAR, {}), ("pissa", SAME, "peft", LINEAR, {}),
                          ("pissa_niter_2", REFUSED, "peft", LINEAR, {}), ("olora", REFUSED, "peft", LINEAR, {}),
                          ("corda", REFUSED, "json", LINEAR, {}), ("loftq", REFUSED, "json", LINEAR, {}),
                          ("lora_ga", REFUSED, "json", LINEAR, {})],
    "layers_to_transform": [(0, SAME, "peft", BLOCKS, {"target_modules": ["layer"], "layers_pattern": "layers"}),
                            ([1], SAME, "peft", NESTED, {"target_modules": ["layer"]}),
                            ([0], SAME, "peft", NESTED, {"target_modules": ["layer", "model.blocks.1.layer"]})],
    "layers_pattern": [("layers", SAME, "peft", BLOCKS, {"target_modules": ["layer"], "layers_to_transform": [1]}),
                       (["blocks"], SAME, "peft", NESTED, {"target_modules": ["layer"], "layers_to_transform": [0]})],
    "rank_pattern": [({"head": 4}, SAME, "peft", LINEAR, {}), ({"lay.*": 3, "layer": 1}, SAME, "peft", LINEAR, {}),
                     ({"layer": 4}, SAME, "peft", LINEAR, {"init_lora_weights": "pissa"})],
    "alpha_pattern": [({"head": 16}, SAME, "peft", LINEAR, {}),
                      ({"head": 16}, SAME, "peft", LINEAR, {"use_rslora": True, "rank_pattern": {"layer": 4}})],
    "megatron_config": [({"tensor_model_parallel_size": 1}, REFUSED, "json", LINEAR, {})],
    "megatron_core": [("my.megatron", SAME, "peft", LINEAR, {})],
    "trainable_token_indices": [([0, 3], SAME, "peft", TOKENS, {"target_modules": ["proj"]}),
                                ({"embed_tokens": [1]}, SAME, "peft", TOKENS, {"target_modules": ["head"]}),
                                ([96], REFUSED, "json", TOKENS, {"target_modules": ["proj"]})],
    "loftq_config": [({"loftq_bits": 4}, SAME, "json", LINEAR, {})],
    "eva_config": [({"rho": 2.0}, SAME, "json", LINEAR, {})],
    "corda_config": [({"cache_file": None}, SAME, "json", LINEAR, {})],
    "lora_ga_config": [({"direction": "ArB2r"}, SAME, "json", LINEAR, {})],
    "use_dora": [(True, SAME, "peft", LINEAR, {}), (True, SAME, "peft", FACTORIES["conv2d"], {}),
                 (True, SAME, "peft", FACTORIES["conv1d"], {}), (True, SAME, "peft", FACTORIES["hf_conv1d"], {}),
                 (True, SAME, "peft", LINEAR, {"use_rslora": True, "lora_dropout": 0.1}),
                 (True, SAME, "peft", FACTORIES["embedding"], {})],
    "velora_config": [(VeloraConfig(num_groups=1), REFUSED, "peft", LINEAR, {})],
    "alora_invocation_tokens": [([1, 2], REFUSED, "json", LINEAR, {})],
    "use_qalora": [(True, REFUSED, "json", LINEAR, {})],
    "qalora_group_size": [(8, SAME, "peft", LINEAR, {})],
    "monteclora_config": [({"monteclora_n": 4}, REFUSED, "json", LINEAR, {})],
    "layer_replication": [([[0, 2], [1, 2]], REFUSED, "json", BLOCKS, {"target_modules": ["layer"]})],
    "runtime_config": [({"ephemeral_gpu_offload": True}, SAME, "json", LINEAR, {})],
    "lora_bias": [(True, SAME, "peft", LINEAR, {}), (True, SAME, "peft", FACTORIES["conv2d"], {}),
                  (True, SAME, "peft", FACTORIES["hf_conv1d"], {}),
                  (True, REFUSED, "json", FACTORIES["embedding"], {"target_modules": ["layer"]})],
    "target_parameters": [(["layer.weight"], REFUSED, "peft", LINEAR, {"target_modules": None})],
    "use_bdlora": [(BdLoraConfig(target_modules_bd_a=["layer"], nblocks=2), REFUSED, "peft", BLOCKS,
                    {"target_modules": ["layer"]})],
    "arrow_config": [({"top_k": 1}, REFUSED, "json", LINEAR, {})],
    "kasa_config": [({}, REFUSED, "json", LINEAR, {})],
    "ensure_weight_tying": [(True, REFUSED, "peft", LINEAR, {})],
}
NEWER_PEFT = {  # rows of fields that only newer PEFT versions have: they join CASES where the installed PEFT has them
    "astra_config": [({"rank": 4}, REFUSED, "json", LINEAR, {})],  # PEFT 0.22
}
CASES.update({k: v for k, v in NEWER_PEFT.items() if k in {f.name for f in dataclasses.fields(peft.LoraConfig)}})
NOT_SET_BY_USERS = {"peft_type": "PEFT writes 'LORA' itself; other values are other methods (test_errors: other-peft-type)"}
REFUSAL_NAMES: dict[str, str] = {}  # field -> the words of its refusal, where they are not the field's name


def test_the_table_lists_every_field_of_the_installed_peft():
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(CASES) | set(NOT_SET_BY_USERS) == fields, (
        f"LoraConfig fields without a row: {sorted(fields - set(CASES) - set(NOT_SET_BY_USERS))}; "
        f"rows for fields PEFT no longer has: {sorted(set(CASES) - fields)}")


def peft_saved(factory, kw: dict, directory, json_edit: dict | None = None) -> torch.Tensor:
    """A PEFT adapter with random factors saved to ``directory``; returns PEFT's outputs on the example input."""
    base = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(factory(), peft.LoraConfig(**kw)).eval()
    perturb_adapters(model)
    with torch.no_grad():
        expected = model(base.example_input())
    model.save_pretrained(str(directory))
    if json_edit:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **json_edit}))
    return expected


ROWS = [(field, *case) for field, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("field, value, expectation, how, factory, extra", ROWS,
                         ids=[f"{r[0]}={r[1]!r}"[:48] for r in ROWS])
def test_a_peft_adapter_loads_with_peft_outputs_or_is_refused_by_name(field, value, expectation, how, factory, extra,
                                                                       tmp_path):
    kw = {**BASE, **extra, **({field: value} if how == "peft" else {})}
    expected = peft_saved(factory, kw, tmp_path, {field: value} if how == "json" else None)
    model = factory()
    before = state_snapshot(model)
    if expectation == SAME:
        lk.load_adapter(model, tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(model(model.example_input()), expected, atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(lk.AdapterLoadError, match=REFUSAL_NAMES.get(field, field)):
            lk.load_adapter(model, tmp_path)
        assert_same_state(model, before)


@pytest.mark.parametrize("conv", [dict(padding_mode="reflect"), dict(padding_mode="circular"),
                                  dict(padding=2, dilation=2)], ids=["reflect", "circular", "dilation"])
def test_a_peft_conv_adapter_that_peft_computes_differently_is_refused(conv, tmp_path):
    """PEFT's LoRA convolution pads with zeros and has no dilation; lorakit follows the base convolution."""
    factory = seeded(Conv2dNet, **conv)
    if "dilation" not in conv:
        peft_saved(factory, dict(BASE), tmp_path)
    else:  # PEFT cannot even run it (its lora_A output has another size): write the file by hand
        peft_saved(seeded(Conv2dNet, padding=2), dict(BASE), tmp_path)
    model = factory()
    before = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match=r"PEFT computes it differently.*(padding_mode|dilation)"):
        lk.load_adapter(model, tmp_path)
    assert_same_state(model, before)


# -- lorakit -> PEFT ------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])

    def example_input(self):
        return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


class SharedLinear(nn.Module):
    """One Linear reached at two paths (``a`` and ``b``) and used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    def example_input(self):
        return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


class Mixer(nn.Module):
    """A module with a 2-D parameter that is not called ``weight`` (parametrize mode adapts any such parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.mix = nn.Parameter(torch.randn(6, 6) / 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.mixer.mix.t()))

    def example_input(self):
        return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


PEFT_LOADS, LORAKIT_FORMAT = "PEFT loads it", "lorakit's own format"
# (LoRAConfig field, its value, factory, other settings, expectation); the model rows exercise what PEFT would
# compute differently whatever the config says
OPTIONS = [
    ("rank", 3, LINEAR, {}, PEFT_LOADS),
    ("alpha", 7.5, LINEAR, {}, PEFT_LOADS),
    ("dropout", 0.2, LINEAR, {}, PEFT_LOADS),
    ("targets", ["layer"], LINEAR, {}, PEFT_LOADS),
    ("targets", r"la.*", LINEAR, {}, PEFT_LOADS),
    ("targets", "all-linear", LINEAR, {}, PEFT_LOADS),
    ("targets", None, FACTORIES["conv2d"], {}, PEFT_LOADS),
    ("exclude", ["head"], FACTORIES["embedding"], {"targets": None}, PEFT_LOADS),
    ("init", "gaussian", LINEAR, {}, PEFT_LOADS),
    ("init", "svd", LINEAR, {}, PEFT_LOADS),  # PiSSA: written as the plain rank-2r adapter on the original base
    ("init", "svd", FACTORIES["hf_conv1d"], {"rslora": True, "targets": ["layer"]}, PEFT_LOADS),
    ("rslora", True, LINEAR, {}, PEFT_LOADS),
    ("bias", "all", LINEAR, {"targets": ["layer"]}, PEFT_LOADS),
    ("bias", "lora_only", LINEAR, {"targets": ["layer"]}, PEFT_LOADS),
    ("lora_bias", True, LINEAR, {}, PEFT_LOADS),
    ("lora_bias", True, FACTORIES["conv2d"], {"bias": "lora_only"}, PEFT_LOADS),
    ("rank_pattern", {"head": 4}, LINEAR, {}, PEFT_LOADS),
    ("rank_pattern", {"head": 1}, LINEAR, {"init": "svd"}, PEFT_LOADS),
    ("alpha_pattern", {"layer": 1.0}, LINEAR, {"rslora": True, "rank_pattern": {"head": 3}}, PEFT_LOADS),
    ("layers_to_transform", [1], BLOCKS, {"targets": ["layer"], "layers_pattern": "layers"}, PEFT_LOADS),
    ("layers_to_transform", 0, NESTED, {"targets": "all-linear"}, PEFT_LOADS),
    ("layers_pattern", ["blocks"], NESTED, {"targets": ["layer"], "layers_to_transform": [1]}, PEFT_LOADS),
    ("trainable_token_indices", [1, 4], TOKENS, {"targets": ["proj"]}, PEFT_LOADS),
    ("trainable_token_indices", {"head": [0]}, TOKENS, {"targets": ["proj"]}, LORAKIT_FORMAT),  # PEFT drops the bias
    ("dora", True, LINEAR, {}, PEFT_LOADS),
    ("dora", True, FACTORIES["conv2d"], {}, PEFT_LOADS),
    ("dora", True, FACTORIES["embedding"], {}, PEFT_LOADS),
    ("dora", True, FACTORIES["hf_conv1d"], {}, PEFT_LOADS),
    ("dora", True, FACTORIES["conv1d"], {"mode": "parametrize"}, PEFT_LOADS),
    ("dora", True, LINEAR, {"mode": "parametrize"}, PEFT_LOADS),
    ("mode", "parametrize", FACTORIES["conv1d"], {}, PEFT_LOADS),
    ("target_parameter", "mix", seeded(Mixer), {"mode": "parametrize", "targets": ["mixer"]}, LORAKIT_FORMAT),
    ("modules_to_save", ["head"], LINEAR, {"targets": ["layer"]}, PEFT_LOADS),
    ("adapter_dtype", "base", LINEAR, {}, PEFT_LOADS),
    ("model: nn.MultiheadAttention", None, seeded(Attention), {"targets": ["attn"]}, LORAKIT_FORMAT),
    ("model: conv padding_mode='reflect'", None, seeded(Conv2dNet, padding_mode="reflect"), {}, LORAKIT_FORMAT),
    ("model: conv dilation", None, FACTORIES["conv2d_circular"], {}, LORAKIT_FORMAT),
    ("model: shared module", None, seeded(SharedLinear), {"targets": ["a"]}, LORAKIT_FORMAT),
]


def test_every_lorakit_option_has_a_row():
    rows = {field for field, *_ in OPTIONS}
    assert {f.name for f in dataclasses.fields(lk.LoRAConfig)} <= rows


@pytest.mark.parametrize("field, value, factory, extra, expectation", OPTIONS,
                         ids=[f"{o[0]}={o[1]!r}"[:48] for o in OPTIONS])
def test_a_lorakit_adapter_loads_in_peft_with_lorakit_outputs_or_peft_refuses_it(field, value, factory, extra,
                                                                                  expectation, tmp_path):
    settings = {"rank": 2, "alpha": 4.0, "targets": ["layer", "head"], **extra}
    if not field.startswith("model:"):
        settings[field] = value
    model = lk.inject(factory(), lk.LoRAConfig(**settings))
    perturb_adapters(model)
    x = model.example_input()
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(expected, factory()(x), atol=1e-3)
    lk.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    if expectation == PEFT_LOADS:
        assert written["peft_type"] == "LORA"
        theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)
    else:
        assert written["peft_type"] == "LORAKIT_LORACONFIG" and written["lorakit_reason"]
        with pytest.raises(KeyError, match="LORAKIT_LORACONFIG"):
            peft.PeftModel.from_pretrained(factory(), str(tmp_path))
    ours = lk.load_adapter(factory(), tmp_path)  # lorakit reads both back, onto the original base
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_pissa_reloaded_on_the_original_base_gives_the_trained_outputs(tmp_path):
    """The residual W_res lives only in the trained model; the file must describe W_res + s B A on the original W
    (before: init_lora_weights=true with the trained A, B, off by 0.36 in lorakit and in PEFT)."""
    model = lk.inject(LINEAR(), lk.LoRAConfig(rank=2, alpha=4.0, targets=["layer", "head"], init="svd"))
    perturb_adapters(model, std=0.3)
    x = model.example_input()
    with torch.no_grad():
        trained = model(x)
    lk.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (4, 8.0, True)
    plain = lk.inject(LINEAR(), lk.LoRAConfig(rank=2, alpha=4.0, targets=["layer", "head"]))
    for key in ("layer", "head"):  # the trained factors on the original base, which the old file meant
        plain.get_submodule(key).lora_A["default"].weight.data.copy_(model.get_submodule(key).lora_A["default"].weight)
        plain.get_submodule(key).lora_B["default"].weight.data.copy_(model.get_submodule(key).lora_B["default"].weight)
    with torch.no_grad():
        assert (plain(x) - trained).abs().max() > 0.05
        torch.testing.assert_close(lk.load_adapter(LINEAR(), tmp_path)(x), trained, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(peft.PeftModel.from_pretrained(LINEAR(), str(tmp_path))(x), trained,
                                   atol=1e-5, rtol=1e-5)


def test_a_saved_pissa_adapter_resumes_into_its_own_pissa_start_and_no_other(tmp_path):
    """Resuming training (inject init='svd' on the same base, then load): the file's second halves are this
    adapter's start [A0 ; -B0], so A and B load back into the rank-r PiSSA adapter; another start is refused."""
    cfg = lk.LoRAConfig(rank=2, alpha=4.0, targets=["layer", "head"], init="svd")
    model = lk.inject(LINEAR(), cfg)
    perturb_adapters(model, std=0.3)
    x = model.example_input()
    with torch.no_grad():
        trained = model(x)
    lk.save_adapter(model, tmp_path)
    resumed = lk.load_adapter(lk.inject(LINEAR(), cfg), tmp_path)
    assert resumed.layer.lora_A["default"].weight.shape == (2, 6)
    with torch.no_grad():
        torch.testing.assert_close(resumed(x), trained, atol=1e-5, rtol=1e-5)
    other_base = LINEAR()
    with torch.no_grad():
        other_base.layer.weight.mul_(1.5)
    other = lk.inject(other_base, cfg)
    before = state_snapshot(other)
    with pytest.raises(lk.AdapterLoadError, match=r"is PiSSA \(rank 2\); .* holds a plain rank-4 adapter whose second half is not this adapter's start"):
        lk.load_adapter(other, tmp_path)
    assert_same_state(other, before)
