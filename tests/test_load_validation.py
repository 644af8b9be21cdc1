"""Read, then act (issue 11): every config field is validated (dataclasses and adapter_config.json) with
"<field>=<value!r> ...; expected ..." messages, and what a file must hold is computed on a meta twin of the
model, which agrees with what inject then builds and never touches the model."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from lorakit.checkpoint_config import FileConfig
from lorakit.checkpoint_tensors import adapter_tensors, expected_tensors, meta_twin
from conftest import FACTORIES, assert_same_state, perturb_adapters, state_snapshot

pytestmark = pytest.mark.usefixtures("single_thread")


# -- every dataclass field ----------------------------------------------------------------------------
# (config class, field, bad value, exception, message regex)
BAD_FIELDS = [
    (lk.LoRAConfig, "rank", 0, ValueError, r"rank=0 is out of range; expected an integer >= 1"),
    (lk.LoRAConfig, "rank", True, TypeError, r"rank=True is not an integer"),
    (lk.LoRAConfig, "rank", "8", TypeError, r"rank='8' is not an integer"),
    (lk.LoRAConfig, "alpha", "16", TypeError, r"alpha='16' is not a number; expected a finite number"),
    (lk.LoRAConfig, "alpha", [16], TypeError, r"alpha=\[16\] is not a number"),
    (lk.LoRAConfig, "alpha", False, TypeError, r"alpha=False is not a number"),
    (lk.LoRAConfig, "alpha", math.inf, ValueError, r"alpha=inf is out of range; expected a finite number"),
    (lk.LoRAConfig, "alpha", math.nan, ValueError, r"alpha=nan is out of range"),
    (lk.LoRAConfig, "dropout", 1.0, ValueError, r"dropout=1.0 is out of range; expected a finite number in \[0, 1\)"),
    (lk.LoRAConfig, "dropout", "0.1", TypeError, r"dropout='0.1' is not a number"),
    (lk.LoRAConfig, "targets", 3, TypeError, r"targets=3 is not a target spec; expected a regex string"),
    (lk.LoRAConfig, "targets", [], ValueError, r"targets=\[\] is empty"),
    (lk.LoRAConfig, "targets", ["q", ""], TypeError, r"targets=\['q', ''\] is not a target spec"),
    (lk.LoRAConfig, "targets", "(", ValueError, r"targets='\(' is not a valid regular expression"),
    (lk.LoRAConfig, "exclude", {"a": 1}, TypeError, r"exclude=\{'a': 1\} is not a target spec"),
    (lk.LoRAConfig, "init", "xavier", ValueError, r"init='xavier' is not supported; choose one of"),
    (lk.LoRAConfig, "init", None, ValueError, r"init=None is not supported"),
    (lk.LoRAConfig, "rslora", "yes", TypeError, r"rslora='yes' is not a boolean; expected True or False"),
    (lk.LoRAConfig, "rslora", 1, TypeError, r"rslora=1 is not a boolean"),
    (lk.LoRAConfig, "mode", "fused", ValueError, r"mode='fused' is not supported"),
    (lk.LoRAConfig, "target_parameter", "", ValueError, r"target_parameter='' is not a parameter name"),
    (lk.LoRAConfig, "modules_to_save", "head", TypeError, r"modules_to_save='head' is not a list of module names"),
    (lk.LoRAConfig, "adapter_dtype", "bf16", ValueError, r"adapter_dtype='bf16' is not supported"),
    (lk.LoRAConfig, "dora", "yes", TypeError, r"dora='yes' is not a boolean"),
    (lk.LoRAConfig, "bias", "some", ValueError, r"bias='some' is not supported; choose one of \['all', 'lora_only', 'none'\]"),
    (lk.LoRAConfig, "lora_bias", 1, TypeError, r"lora_bias=1 is not a boolean"),
    (lk.LoRAConfig, "trainable_token_indices", [2, 2], ValueError, r"trainable_token_indices=\[2, 2\] repeats an index"),
    (lk.LoRAConfig, "rank_pattern", {"q": 1.5}, TypeError, r"rank_pattern\['q'\]=1.5 is not an integer"),
    (lk.LoRAConfig, "alpha_pattern", {"q": float("nan")}, ValueError, r"alpha_pattern\['q'\]=nan is out of range"),
    (lk.LoRAConfig, "layers_to_transform", "0", TypeError, r"layers_to_transform='0' is not a block index"),
    (lk.LoRAConfig, "layers_pattern", "layers", ValueError, r"layers_pattern='layers' without layers_to_transform"),
    (lk.AdapterConfig, "bottleneck", 0, ValueError, r"bottleneck=0 is out of range"),
    (lk.AdapterConfig, "bottleneck", 2.0, TypeError, r"bottleneck=2.0 is not an integer"),
    (lk.AdapterConfig, "activation", "swish", ValueError, r"activation='swish' is not supported"),
    (lk.AdapterConfig, "init", "zeros", ValueError, r"init='zeros' is not supported"),
    (lk.AdapterConfig, "targets", 1, TypeError, r"targets=1 is not a target spec"),
    (lk.AdapterConfig, "exclude", 1, TypeError, r"exclude=1 is not a target spec"),
    (lk.AdapterConfig, "modules_to_save", [1], TypeError, r"modules_to_save=\[1\] is not a list"),
    (lk.AdapterConfig, "adapter_dtype", 32, ValueError, r"adapter_dtype=32 is not supported"),
    (lk.PromptConfig, "num_tokens", 0, ValueError, r"num_tokens=0 is out of range"),
    (lk.PromptConfig, "num_tokens", "10", TypeError, r"num_tokens='10' is not an integer"),
    (lk.PromptConfig, "init", "words", ValueError, r"init='words' is not supported"),
    (lk.PromptConfig, "init", "text", ValueError, r"init_text=None with init='text'; expected a non-empty string"),
    (lk.PromptConfig, "init_text", "hello", ValueError, r"init_text='hello' is used only with init='text'"),
    (lk.PromptConfig, "tokenizer", "gpt2", ValueError, r"tokenizer='gpt2' is used only with init='text'"),
    (lk.PromptConfig, "modules_to_save", "x", TypeError, r"modules_to_save='x' is not a list"),
    (lk.CLoRAConfig, "rank", -1, ValueError, r"rank=-1 is out of range"),
    (lk.CLoRAConfig, "alpha", "32", TypeError, r"alpha='32' is not a number"),
    (lk.CLoRAConfig, "decay_start", 1.5, ValueError, r"decay_start=1.5 is out of range; expected a finite number in \[0, 1\]"),
    (lk.CLoRAConfig, "decay_end", None, TypeError, r"decay_end=None is not a number"),
    (lk.CLoRAConfig, "decay_start", 0.9, ValueError, r"decay_start=0.9 is after decay_end=0.85"),
    (lk.CLoRAConfig, "decay_floor", 1.0, ValueError, r"decay_floor=1.0 is out of range; expected a finite number in \[0, 1\)"),
    (lk.CLoRAConfig, "noise", "gaussian", ValueError, r"noise='gaussian' is not supported"),
    (lk.CLoRAConfig, "bias", "true", TypeError, r"bias='true' is not a boolean"),
    (lk.CLoRAConfig, "init", "kaiming", ValueError, r"init='kaiming' is not supported"),
    (lk.CLoRAConfig, "targets", 0, TypeError, r"targets=0 is not a target spec"),
    (lk.CLoRAConfig, "exclude", 0, TypeError, r"exclude=0 is not a target spec"),
    (lk.CLoRAConfig, "modules_to_save", 0, TypeError, r"modules_to_save=0 is not a list"),
    (lk.CLoRAConfig, "adapter_dtype", None, ValueError, r"adapter_dtype=None is not supported"),
]


@pytest.mark.parametrize("cls, field, value, error, message", BAD_FIELDS,
                         ids=[f"{c.__name__}-{f}-{v!r}" for c, f, v, *_ in BAD_FIELDS])
def test_every_config_field_is_validated(cls, field, value, error, message):
    with pytest.raises(error, match=message):
        cls(**{field: value})


def test_every_dataclass_field_has_a_bad_value_in_the_table():
    import dataclasses

    tested = {(c, f) for c, f, *_ in BAD_FIELDS}
    for cls in (lk.LoRAConfig, lk.AdapterConfig, lk.PromptConfig, lk.CLoRAConfig):
        missing = [f.name for f in dataclasses.fields(cls) if (cls, f.name) not in tested]
        assert not missing, f"{cls.__name__} fields without a validation case: {missing}"


def test_defaults_and_edge_values_are_accepted():
    lk.LoRAConfig(rank=1, alpha=0, dropout=0, targets="all-linear", exclude=[], modules_to_save=[])
    lk.CLoRAConfig(rank=1, alpha=1, decay_start=0.5, decay_end=0.5, decay_floor=0)
    lk.AdapterConfig(), lk.PromptConfig()


# -- the adapter_config.json keys ---------------------------------------------------------------------
def saved(tmp_path, **cfg):
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(**{"rank": 2, "alpha": 4.0, "targets": ["layer", "head"],
                                                               **cfg}))
    perturb_adapters(model)
    lk.save_adapter(model, tmp_path)
    return model


def edit(tmp_path, **changes):
    path = tmp_path / "adapter_config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not DROP}))


DROP = object()
# (key, value, message regex): each refused before the model changes
BAD_KEYS = [
    ("lora_alpha", "4", r"lora_alpha='4' is not a number; expected a finite number"),
    ("lora_alpha", [4], r"lora_alpha=\[4\] is not a number"),
    ("lora_alpha", {"v": 4}, r"lora_alpha=\{'v': 4\} is not a number"),
    ("lora_alpha", None, r"lora_alpha=None is not a number"),
    ("use_rslora", "yes", r"use_rslora='yes' is not a boolean; expected True or False"),
    ("use_rslora", [True], r"use_rslora=\[True\] is not a boolean"),
    ("use_rslora", 1, r"use_rslora=1 is not a boolean"),
    ("r", 2.0, r"r=2.0 is not an integer; expected an integer >= 1"),
    ("r", -2, r"r=-2 is out of range; expected an integer >= 1"),
    ("r", 3, r"lora_A.weight has shape \(2, \d\), the model needs \(3, \d\) \(r=3, lora_alpha=4.0, use_rslora=False\)"),
    ("lora_dropout", 1, r"lora_dropout=1 is out of range; expected a finite number in \[0, 1\)"),
    ("target_modules", None, r"target_modules=None names no module"),
    ("target_modules", 7, r"target_modules=7 is not a target spec"),
    ("target_modules", ["nothing"], r"targets=\['nothing'\] match no supported module; modules that exist include: layer, head"),
    ("exclude_modules", [3], r"exclude_modules=\[3\] is not a target spec"),
    ("modules_to_save", "head", r"modules_to_save='head' is not a list of module names"),
    ("peft_type", "LoRA", r"peft_type='LoRA' is not one lorakit loads"),
    ("peft_type", None, r"peft_type=None is not one lorakit loads"),
    ("init_lora_weights", "xavier", r"init_lora_weights='xavier' is not supported; expected one of"),
    ("init_lora_weights", 1, r"init_lora_weights=1 is not supported"),
    ("inference_mode", "true", r"inference_mode='true' has the wrong type; expected bool"),
    ("task_type", 3, r"task_type=3 has the wrong type; expected str or null"),
    ("fan_in_fan_out", None, r"fan_in_fan_out=None has the wrong type; expected bool"),
    ("use_dora", "false", r"use_dora='false' is not a boolean"),
    ("lorakit_mode", "fused", r"lorakit_mode='fused' is not supported"),
    ("r", DROP, r"has no 'r', which decides the outputs"),
    ("lora_alpha", DROP, r"has no 'lora_alpha', which decides the outputs"),
    ("use_rslora", DROP, r"has no 'use_rslora'.*before PEFT 0.7"),
    ("target_modules", DROP, r"has no 'target_modules'"),
]


@pytest.mark.parametrize("key, value, message", BAD_KEYS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_KEYS])
def test_every_config_key_is_checked_before_the_model_changes(key, value, message, tmp_path):
    saved(tmp_path)
    edit(tmp_path, **{key: value})
    model = FACTORIES["linear"]()
    before = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match=message):
        lk.load_adapter(model, tmp_path)
    assert_same_state(model, before)


def test_a_failed_load_into_an_adapted_model_changes_nothing(tmp_path):
    saved(tmp_path)
    edit(tmp_path, lora_alpha="4")
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=2, targets=["layer"]), name="other")
    model.head.weight.requires_grad_(True)  # the user's own choice survives too
    before = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError):
        lk.load_adapter(model, tmp_path)
    assert_same_state(model, before)


@pytest.mark.parametrize("dtype, accepted", [(torch.float16, True), (torch.bfloat16, True), (torch.float64, True),
                                             (torch.int32, False), (torch.bool, False), (torch.float8_e4m3fn, False)])
def test_tensor_dtype(dtype, accepted, tmp_path):
    """Any ordinary float dtype loads (cast to the factors' dtype); integers, bools and float8 are refused."""
    source = saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: (v * 64).round().clamp(-128, 128) / 64 for k, v in load_file(path).items()}  # exact in every dtype
    save_file(tensors, path)
    expected = lk.load_adapter(FACTORIES["linear"](), tmp_path)(source.example_input())
    save_file({k: v.to(dtype) for k, v in tensors.items()}, path)
    model = FACTORIES["linear"]()
    if accepted:
        assert torch.equal(lk.load_adapter(model, tmp_path)(source.example_input()), expected)
    else:
        before = state_snapshot(model)
        with pytest.raises(lk.AdapterLoadError, match=rf"has dtype {dtype}; expected a floating dtype"):
            lk.load_adapter(model, tmp_path)
        assert_same_state(model, before)


def test_non_finite_values_are_refused(tmp_path):
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.head.lora_B.weight"][0, 0] = math.nan
    save_file(tensors, path)
    with pytest.raises(lk.AdapterLoadError, match=r"'base_model.model.head.lora_B.weight' holds non-finite values"):
        lk.load_adapter(FACTORIES["linear"](), tmp_path)


# -- the meta twin: the plan equals what inject builds, and the model is never touched --------------------
class Shared(nn.Module):
    """One Linear at two paths, an attention module, a tied embedding/head pair and a Conv1D."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.embed = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.again = self.proj
        self.conv1d = Conv1D(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight


def shared_model():
    torch.manual_seed(0)
    return Shared()


PLAN_CASES = [
    ("linear", FACTORIES["linear"], lk.LoRAConfig(rank=2, targets=["layer", "head"], init="svd")),
    ("conv2d-parametrize", FACTORIES["conv2d"], lk.LoRAConfig(rank=2, mode="parametrize")),
    ("conv2d_circular", FACTORIES["conv2d_circular"], lk.LoRAConfig(rank=2)),
    ("embedding", FACTORIES["embedding"], lk.LoRAConfig(rank=3, modules_to_save=["head"])),
    ("hf_conv1d-bf16", lambda: FACTORIES["hf_conv1d"]().to(torch.bfloat16), lk.LoRAConfig(rank=2, adapter_dtype="base")),
    ("shared", shared_model, lk.LoRAConfig(rank=2, targets=["proj", "attn", "conv1d", "embed"], modules_to_save=["norm"])),
    ("adapter", FACTORIES["linear"], lk.AdapterConfig(bottleneck=3, targets=["layer"])),
    ("clora-svd", FACTORIES["linear"], lk.CLoRAConfig(rank=2, targets=["layer"], init="svd")),
]


@pytest.mark.parametrize("case_id, factory, cfg", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_on_the_meta_twin_is_what_inject_builds(case_id, factory, cfg, tmp_path):
    model = factory()
    first = {"shared": ["proj"], "embedding": ["layer"]}.get(case_id, ["head"])  # the plan sees existing wrappers
    lk.inject(model, lk.LoRAConfig(rank=1, targets=first), name="first")
    before = state_snapshot(model)
    plan = expected_tensors(model, FileConfig(cfg, False, tmp_path / "adapter_config.json"), "second")
    assert_same_state(model, before)
    assert "second" not in model.lorakit_configs and all(t.is_meta for t in plan.values())
    lk.inject(model, cfg, name="second")
    built = {k: t for k, (t, _) in adapter_tensors(model, "second").items()}
    assert {k: (tuple(t.shape), t.dtype) for k, t in plan.items()} == \
        {k: (tuple(t.shape), t.dtype) for k, t in built.items()}


def test_meta_twin_keeps_sharing_and_leaves_hooks_and_containers_behind():
    model = lk.inject(shared_model(), lk.LoRAConfig(rank=2, targets=["proj"]))
    calls = []
    model.proj.register_forward_hook(lambda *args: calls.append(1))
    twin = meta_twin(model)
    assert twin.proj is twin.again and twin.head.weight is twin.embed.weight
    assert twin.proj is not model.proj and twin.proj.scaling is not model.proj.scaling
    assert not twin.proj._forward_hooks and model.proj._forward_hooks
    assert all(p.is_meta for p in twin.parameters()) and not any(p.is_meta for p in model.parameters())
