"""A tiny seeded random Llama (the architecture of SmolLM2), built from a config in milliseconds.

Like SmolLM2 it ties the output head to the input embedding and uses grouped-query attention.
"""
from __future__ import annotations

import torch

VOCAB = 96


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(seed: int = 0, **overrides):
    """A LlamaForCausalLM in eval mode; the same ``seed`` gives bit-identical weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def token_batch(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Token ids in 3..VOCAB-1 (no pad, bos or eos)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB ids: <pad> <s> </s>, then role and punctuation words, then w<i>; it has a
    chat template, so it stands in for an instruct model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "system", ":", ".", ","]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def write_tiny_llama(folder, seed: int = 0, **overrides):
    """``tiny_llama(seed)`` and ``tiny_tokenizer()`` saved as a Hugging Face folder (safetensors); returns it."""
    from pathlib import Path

    folder = Path(folder)
    tiny_llama(seed, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
