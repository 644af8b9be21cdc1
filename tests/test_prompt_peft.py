"""Soft prompts in PEFT's prompt-tuning files (``PROMPT_TUNING``), both ways, with PEFT's logits."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.checkpoint import AdapterLoadError
from tiny_llama import tiny_llama, token_batch, write_tiny_llama

peft = pytest.importorskip("peft")
INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}


def batch():
    ids = token_batch(batch=3, length=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # one left-padded row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("init", INITS)
def test_a_lorakit_prompt_is_a_peft_prompt_tuning_file_with_peft_logits(init, tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.PromptConfig(num_tokens=4, init=init))
    lk.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "PROMPT_TUNING" and raw["task_type"] == "CAUSAL_LM"
    assert (raw["num_virtual_tokens"], raw["token_dim"], raw["prompt_tuning_init"]) == (4, 32, INITS[init])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(theirs(**batch()).logits, model(**batch()).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("init", INITS.values())
def test_a_peft_prompt_tuning_file_loads_with_peft_logits(init, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                                        prompt_tuning_init=init))
    theirs.save_pretrained(tmp_path)
    ours = lk.load_adapter(tiny_llama(), tmp_path)
    assert lk.count_parameters(ours).adapter == 5 * 32
    torch.testing.assert_close(ours(**batch()).logits, theirs(**batch()).logits, atol=1e-6, rtol=1e-6)


def test_text_init_takes_the_texts_token_embeddings_as_peft_does(tmp_path):
    folder = write_tiny_llama(tmp_path / "model")
    text = "w4 w5 w6"  # three tokens, repeated and cut to seven
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(folder)))
    ours = lk.inject(tiny_llama(), lk.PromptConfig(num_tokens=7, init="text", init_text=text, tokenizer=str(folder)))
    prompt = ours.lorakit_prompt.prompts["default"]
    torch.testing.assert_close(prompt, theirs.prompt_encoder["default"].embedding.weight)
    embedding = ours.get_input_embeddings().weight
    torch.testing.assert_close(prompt[3], embedding[14])  # w4 is id 14; the 4th virtual token starts the repeat
    lk.save_adapter(ours, tmp_path / "adapter")  # the text and tokenizer are kept, and a load needs no tokenizer
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (raw["prompt_tuning_init"], raw["prompt_tuning_init_text"]) == ("TEXT", text)
    (folder / "tokenizer.json").unlink()
    again = lk.load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(again.lorakit_prompt.prompts["default"], prompt)


@pytest.mark.parametrize("edit, match", [
    ({"token_dim": 64}, "embedding size"),
    ({"num_transformer_submodules": 2}, "num_transformer_submodules=2"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
    ({"prompt_tuning_init": "NOPE"}, "prompt_tuning_init='NOPE'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"some_future_option": 3}, "some_future_option=3"),
], ids=["wider-model", "encoder-decoder", "no-tokens", "init", "modules-to-save", "unknown-key"])
def test_a_peft_prompt_file_that_does_not_fit_is_refused_and_changes_nothing(edit, match, tmp_path):
    width = 64 if "token_dim" in edit else 32  # the file's prompt is made on a wider model
    theirs = peft.get_peft_model(tiny_llama(hidden_size=width), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                          num_virtual_tokens=3))
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **({} if "token_dim" in edit else edit)}))
    model = tiny_llama()
    before = model(**batch()).logits
    with pytest.raises(AdapterLoadError, match=match):
        lk.load_adapter(model, tmp_path)
    assert not hasattr(model, "lorakit_prompt") and not model._forward_pre_hooks
    torch.testing.assert_close(model(**batch()).logits, before, atol=0, rtol=0)


def test_a_prompt_file_of_the_earlier_lorakit_layout_still_loads(tmp_path):
    from safetensors.torch import save_file

    model = tiny_llama()
    lk.inject(model, lk.PromptConfig(num_tokens=2))
    prompt = model.lorakit_prompt.prompts["default"].detach().clone()
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORAKIT_PROMPTCONFIG", "num_tokens": 2, "init": "random", "modules_to_save": None}))
    save_file({"base_model.model.lorakit_prompt.prompt_embeddings": prompt}, tmp_path / "adapter_model.safetensors")
    loaded = lk.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits, atol=0, rtol=0)
