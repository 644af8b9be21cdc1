"""Soft prompts on tiny random Hugging Face encoder, decoder and encoder-decoder models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers.prompt import SoftPrompt

transformers = pytest.importorskip("transformers")
VOCAB = 40


def tiny_bert():
    from lorakit.models.hf import tiny_bert_config

    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(tiny_bert_config(vocab_size=VOCAB)).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=8,
                                   vocab_size=VOCAB, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def batch(kind: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                "labels": torch.tensor([0, 1])}
    if kind == "gpt2":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(1, VOCAB, (2, 4), generator=gen)}


CASES = [("bert", tiny_bert), ("gpt2", tiny_gpt2), ("t5", tiny_t5)]


@pytest.mark.parametrize("kind, factory", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("init", ["random", "vocab"])
def test_prompt_through_a_normal_call(kind, factory, init):
    model = factory()
    base = model(**batch(kind))
    lk.inject(model, lk.PromptConfig(num_tokens=3, init=init))
    count = lk.count_parameters(model)
    assert count.trainable == count.adapter == 3 * 16
    out = model(**batch(kind))
    assert torch.isfinite(out.loss)
    assert out.logits.shape[0] == 2
    if kind == "gpt2":  # decoder-only: logits cover the prompt positions too, labels were padded with -100
        assert out.logits.shape[1] == 3 + 6
    else:
        assert out.logits.shape == base.logits.shape
    out.loss.backward()
    prompt = model.lorakit_prompt.prompts["default"]
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lorakit_prompt" not in n)


def test_prompt_positions_extend_mask_and_types():
    model = tiny_bert()
    seen = {}
    model.bert.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    lk.inject(model, lk.PromptConfig(num_tokens=3))
    inputs = batch("bert")
    model(**inputs)
    assert seen["inputs_embeds"].shape == (2, 9, 16)
    assert seen["attention_mask"].tolist()[1] == [1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert seen["token_type_ids"].shape == (2, 9)
    torch.testing.assert_close(seen["inputs_embeds"][0, :3], model.lorakit_prompt.prompts["default"])


def test_positional_and_keyword_calls_agree():
    model = tiny_bert()
    lk.inject(model, lk.PromptConfig(num_tokens=2))
    inputs = batch("bert")
    torch.testing.assert_close(model(inputs["input_ids"], inputs["attention_mask"]).logits,
                               model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits)


@pytest.mark.parametrize("kind, factory", CASES, ids=[c[0] for c in CASES])
def test_disabled_delete_and_save_load(kind, factory, tmp_path):
    model = factory()
    base = model(**batch(kind)).logits
    lk.inject(model, lk.PromptConfig(num_tokens=4, init="vocab"))
    prompted = model(**batch(kind)).logits
    with lk.disabled(model):
        torch.testing.assert_close(model(**batch(kind)).logits, base)
    lk.save_adapter(model, tmp_path)
    fresh = factory()
    lk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(**batch(kind)).logits, prompted)
    lk.delete_adapter(fresh, "default")
    assert not hasattr(fresh, "lorakit_prompt") and not fresh._forward_pre_hooks
    torch.testing.assert_close(fresh(**batch(kind)).logits, base)


def test_named_prompts_and_modules_to_save():
    model = tiny_bert()
    base = model(**batch("bert")).logits
    lk.inject(model, lk.PromptConfig(num_tokens=2, modules_to_save=["classifier"]), name="a")
    lk.inject(model, lk.PromptConfig(num_tokens=5), name="b")
    assert model.lorakit_prompt.adapter_names == ["a", "b"]
    assert lk.count_parameters(model).trainable == 5 * 16
    lk.set_active(model, "a")
    assert lk.count_parameters(model).trainable == 2 * 16 + 16 * 2 + 2  # prompt + classifier copy
    with pytest.raises(ValueError, match="cannot be merged"):
        lk.merge(model)
    lk.unload(model, merge=False)
    assert not hasattr(model, "lorakit_prompt") and not model._forward_pre_hooks
    torch.testing.assert_close(model(**batch("bert")).logits, base)


def test_model_without_inputs_embeds_is_refused_unchanged():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="inputs_embeds"):
        lk.inject(model, lk.PromptConfig(num_tokens=2))
    assert not hasattr(model, "lorakit_prompt") and not hasattr(model, "lorakit_configs")
    assert not model._forward_pre_hooks and all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, SoftPrompt) for m in model.modules())


def test_load_into_a_model_of_another_width_is_refused_unchanged(tmp_path):
    from lorakit.models.hf import tiny_bert_config

    model = tiny_bert()
    lk.inject(model, lk.PromptConfig(num_tokens=2))
    lk.save_adapter(model, tmp_path)
    wider = transformers.BertForSequenceClassification(tiny_bert_config(vocab_size=VOCAB, hidden_size=32)).eval()
    with pytest.raises(ValueError, match="does not fit"):
        lk.load_adapter(wider, tmp_path)
    assert not hasattr(wider, "lorakit_prompt") and not wider._forward_pre_hooks
    assert "lorakit_configs" not in wider.__dict__ and all(p.requires_grad for p in wider.parameters())
