"""A soft prompt under ``generate()``: the KV cache, no cache and a full-sequence greedy loop give the same
tokens, a left-padded batch equals its rows generated alone, and beam search and sampling run."""
from __future__ import annotations

import pytest
import torch

import lorakit as lk
from tiny_llama import tiny_llama, token_batch

transformers = pytest.importorskip("transformers")
NEW = 6


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    return transformers.GPT2LMHeadModel(config).eval()


def lively_llama():
    """At the default init (0.02) a tiny random Llama repeats its last token whatever came before."""
    return tiny_llama(initializer_range=0.2)


MODELS = {"llama": lively_llama, "gpt2": tiny_gpt2}


def prompted(kind: str):
    model = MODELS[kind]()
    lk.inject(model, lk.PromptConfig(num_tokens=4, init="vocab"))
    with torch.no_grad():  # a prompt far from the vocabulary rows, so a mistake shows in the tokens
        model.lorakit_prompt.prompts["default"].mul_(8.0)
    return model


def greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                         min_new_tokens=NEW, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def full_sequence_loop(model, ids: torch.Tensor) -> torch.Tensor:
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache."""
    seq = ids
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1]
            logits[:, 2] = -float("inf")  # min_new_tokens: eos is not allowed
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("kind", MODELS)
def test_cache_no_cache_and_a_full_sequence_loop_give_the_same_tokens(kind):
    model = prompted(kind)
    ids = token_batch(batch=3, length=5)
    reference = full_sequence_loop(model, ids)
    assert torch.equal(greedy(model, ids, use_cache=False), reference)
    assert torch.equal(greedy(model, ids, use_cache=True), reference)
    with lk.disabled(model):  # the check can fail: the prompt changes what is generated
        assert not torch.equal(greedy(model, ids), reference)


@pytest.mark.parametrize("kind", MODELS)
def test_a_left_padded_batch_equals_its_rows_generated_alone(kind):
    model = prompted(kind)
    rows = [token_batch(batch=1, length=n, seed=s)[0] for n, s in ((6, 1), (3, 2), (4, 3))]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)[:, width:]
    for i, row in enumerate(rows):
        alone = greedy(model, row[None])
        assert torch.equal(batched[i], alone[0]), f"row {i}: {batched[i].tolist()} != {alone[0].tolist()}"


def test_logits_of_a_cached_step_equal_the_full_sequence():
    model = prompted("llama")
    ids = token_batch(batch=2, length=5)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=5)],
                         ids=["beam-search", "sampling"])
def test_beam_search_and_sampling_run(options):
    model = prompted("llama")
    ids = token_batch(batch=2, length=4)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                         pad_token_id=0, **options)
    assert out.shape == (2, 4 + NEW) and torch.equal(out[:, :4], ids)
