"""The settings PEFT users publish, combined (issue 20): DoRA, rank and alpha patterns, layer selection, biases,
trainable tokens and modules_to_save together, on an MLP, a conv net and tiny Llamas (tied and untied head); and
trainable tokens, which need an embedding model, alone.

Each row is built twice, from the same settings: by PEFT (saved, then loaded by lorakit: PEFT's outputs), and by
lorakit (saved, then loaded by PEFT: lorakit's outputs). Each setting alone has its rows in test_peft_fields.py
(trainable tokens' invariants in test_trainable_tokens.py).
"""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit as lk
from conftest import FACTORIES, TokenNet, perturb_adapters, seeded
from lorakit.checkpoint_config import READ
from tiny_llama import tiny_llama, token_batch

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]


def llama(tie: bool):
    def factory():
        return tiny_llama(tie_word_embeddings=tie)
    factory.example_input = token_batch
    return factory


MLP, CONV, TOKENS = FACTORIES["linear"], FACTORIES["conv2d"], seeded(TokenNet)
# (id, factory, PEFT LoraConfig settings beyond r=2, lora_alpha=4)
COMBINATIONS = [
    ("mlp-dora-patterns-lora_only", MLP, dict(target_modules=["layer", "head"], use_dora=True,
                                             rank_pattern={"head": 4}, alpha_pattern={"layer": 8}, bias="lora_only")),
    ("mlp-lora_bias-rslora-all", MLP, dict(target_modules=["layer", "head"], lora_bias=True, use_rslora=True,
                                          rank_pattern={"layer": 3}, bias="all")),
    ("mlp-dora-dropout-modules_to_save", MLP, dict(target_modules=["layer"], use_dora=True, lora_dropout=0.1,
                                                  modules_to_save=["head"])),
    ("conv-dora-patterns-all", CONV, dict(target_modules=["layer", "head"], use_dora=True, rank_pattern={"layer": 3},
                                         alpha_pattern={"head": 1.5}, bias="all")),
    ("conv-lora_bias-rslora", CONV, dict(target_modules=["layer", "head"], lora_bias=True, use_rslora=True,
                                        alpha_pattern={"layer": 16}, bias="lora_only")),
    ("llama-tied-dora-blocks-tokens", llama(True), dict(
        target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, rank_pattern={"down_proj": 4},
        alpha_pattern={"v_proj": 16}, layers_to_transform=[1], layers_pattern="layers", trainable_token_indices=[5, 7])),
    ("llama-untied-lora_bias-blocks-head-rows", llama(False), dict(
        target_modules=["q_proj", "o_proj"], lora_bias=True, layers_to_transform=[0],
        trainable_token_indices={"embed_tokens": [3], "lm_head": [4, 5]})),
    ("llama-tied-all-linear-dora-rslora-tokens", llama(True), dict(
        target_modules="all-linear", exclude_modules=["gate_proj"], use_dora=True, use_rslora=True,
        rank_pattern={r"layers\.0\..*": 3}, trainable_token_indices={"embed_tokens": [9], "lm_head": [9]})),
]
TOKEN_ROWS = [  # trainable tokens alone (with LoRA somewhere), the ways PEFT resolves and ties them
    ("tokens-tied-list", llama(True), dict(target_modules=["q_proj"], trainable_token_indices=[5, 7, 9])),
    ("tokens-untied-list", llama(False), dict(target_modules=["q_proj"], trainable_token_indices=[5, 9])),
    ("tokens-untied-head-rows", llama(False),
     dict(target_modules=["v_proj"], trainable_token_indices={"embed_tokens": [5, 7], "lm_head": [3, 4, 8]})),
    ("tokens-tied-both-named", llama(True),
     dict(target_modules=["v_proj"], trainable_token_indices={"embed_tokens": [6, 7], "lm_head": [6, 7]})),
    ("tokens-plain-model-list", TOKENS, dict(target_modules=["proj"], trainable_token_indices=[0, 3])),
    ("tokens-plain-model-dict", TOKENS, dict(target_modules=["head"], trainable_token_indices={"embed_tokens": [2, 9]})),
]
COMBINATIONS += TOKEN_ROWS
IDS = [c[0] for c in COMBINATIONS]


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def example(factory):
    return factory.example_input() if hasattr(factory, "example_input") else factory().example_input()


def lorakit_config(settings: dict) -> lk.LoRAConfig:
    """The same settings as lorakit's config, through the loader's own PEFT-key table."""
    return lk.LoRAConfig(rank=2, alpha=4.0, **{READ[key][0]: value for key, value in settings.items()})


@pytest.mark.parametrize("name, factory, settings", COMBINATIONS, ids=IDS)
def test_a_peft_adapter_with_combined_settings_loads_with_peft_outputs(name, factory, settings, tmp_path):
    x = example(factory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=2, lora_alpha=4, **settings)).eval()
    perturb_adapters(theirs, std=0.3)
    expected = run(theirs, x)
    assert not torch.allclose(expected, run(factory(), x), atol=1e-3)
    theirs.save_pretrained(str(tmp_path))
    ours = lk.load_adapter(factory(), tmp_path)
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, factory, settings", COMBINATIONS, ids=IDS)
def test_a_lorakit_adapter_with_combined_settings_loads_in_peft_with_lorakit_outputs(name, factory, settings, tmp_path):
    x = example(factory)
    model = lk.inject(factory(), lorakit_config(settings)).eval()
    perturb_adapters(model, std=0.3)
    expected = run(model, x)
    lk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    torch.testing.assert_close(run(theirs, x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(lk.load_adapter(factory(), tmp_path), x), expected, atol=1e-5, rtol=1e-5)
