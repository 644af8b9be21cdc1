"""``save_pretrained`` on a lorakit-injected Hugging Face model writes a PEFT-layout adapter folder (never a whole
model that ``from_pretrained`` would misload), which lorakit, PEFT's Auto class and transformers load back with the
same logits. Keyword arguments it cannot honour are refused by name; without adapters the method is the model's."""
import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402
from tiny_llama import tiny_llama, token_batch, write_tiny_llama  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def lora(model, name="default", seed=0):
    """A LoRA adapter whose B factors are non-zero, so it changes the logits."""
    lk.inject(model, lk.LoRAConfig(rank=4, alpha=8, targets="all-linear"), name=name)
    torch.manual_seed(seed)
    for key, param in model.named_parameters():
        if "lora_B" in key and f".{name}." in key:
            torch.nn.init.normal_(param, std=0.2)
    return model


def from_folder(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


def test_it_writes_the_adapter_only_and_three_loaders_give_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base_folder = write_tiny_llama(tmp_path / "base")
    model = lora(from_folder(base_folder))
    model.save_pretrained(tmp_path / "saved")

    assert {p.name for p in (tmp_path / "saved").iterdir()} == ADAPTER_FILES
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"]) == ("LORA", "CAUSAL_LM")
    assert config["base_model_name_or_path"] == str(base_folder)
    expected = logits(model)
    assert not torch.allclose(expected, logits(from_folder(base_folder)), atol=1e-3)  # the adapter matters

    reloaded = lk.load_adapter(from_folder(base_folder), tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)
    transformers_own = from_folder(tmp_path / "saved")  # transformers' PEFT integration: base + adapter
    torch.testing.assert_close(logits(transformers_own), expected, atol=1e-5, rtol=0)


def test_keywords_it_cannot_honour_are_refused_by_name(tmp_path):
    model = lora(tiny_llama())
    with pytest.raises(TypeError, match="max_shard_size, state_dict"):
        model.save_pretrained(tmp_path, state_dict=model.state_dict(), max_shard_size="1GB")
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(KeyError, match="'fr'"):
        model.save_pretrained(tmp_path, selected_adapters=["fr"])
    assert not any(tmp_path.iterdir())
    model.save_pretrained(tmp_path / "quiet", is_main_process=False)
    assert not (tmp_path / "quiet").exists()
    model.save_pretrained(tmp_path / "none", state_dict=None, variant=None)  # None: the same as not given
    assert {p.name for p in (tmp_path / "none").iterdir()} == ADAPTER_FILES


def test_several_adapters_are_laid_out_as_peft_lays_them_out(tmp_path):
    model = lora(lora(tiny_llama()), name="fr", seed=1)
    model.save_pretrained(tmp_path / "all")
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / "all").iterdir()}  # "default" at the top
    assert {p.name for p in (tmp_path / "all" / "fr").iterdir()} == ADAPTER_FILES
    model.save_pretrained(tmp_path / "one", selected_adapters=["fr"])
    assert {p.name for p in (tmp_path / "one").iterdir()} == {"fr"}
    fresh = lk.load_adapter(tiny_llama(), tmp_path / "one" / "fr", name="fr")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-5, rtol=0)  # "fr" is active in both


@pytest.mark.parametrize("removal", ["unload", "delete_adapter"])
def test_without_adapters_it_is_the_model_own_method_again(removal, tmp_path):
    model = lora(lora(tiny_llama()), name="fr")
    assert "save_pretrained" in vars(model)
    if removal == "unload":
        lk.unload(model, merge=False)
    else:
        lk.delete_adapter(model, "fr")
        assert "save_pretrained" in vars(model)  # one adapter is left
        lk.delete_adapter(model, "default")
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}


def test_compressing_the_last_adapter_gives_the_model_own_method_back():
    model = lk.inject(tiny_llama(), lk.CLoRAConfig(rank=4, alpha=8, targets=["q_proj"]))
    assert "save_pretrained" in vars(model)
    lk.compress(model, force=True)
    assert "save_pretrained" not in vars(model)


def test_a_copy_saves_its_own_adapter_and_a_plain_module_gets_none(tmp_path):
    model = lora(tiny_llama())
    twin = copy.deepcopy(model)
    torch.nn.init.zeros_(twin.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    twin.save_pretrained(tmp_path)
    reloaded = lk.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(twin), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(reloaded), logits(model), atol=1e-4)

    plain = lk.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), lk.LoRAConfig(rank=2, targets=["0"]))
    assert "save_pretrained" not in vars(plain)


def test_a_failed_inject_leaves_no_save_pretrained_behind():
    model = tiny_llama()
    with pytest.raises(ValueError):
        lk.inject(model, lk.LoRAConfig(rank=4, targets=["no_such_module"]))
    assert "save_pretrained" not in vars(model)
