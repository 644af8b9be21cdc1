"""Instruction-tuning JSONL (lorakit.data.chat): malformed lines named by line, labels on the answers only (ids
written out by hand for the tiny word-level tokenizer), padding on either side, and the loss against transformers'."""
import json

import pytest
import torch

import lorakit as lk
from lorakit.data.chat import (IGNORE, SFTCollator, SFTDataset, encode_prompt, parse_line, read_jsonl,
                               tokenize_example)
from lorakit.experiments.finetune import example_losses
from tiny_llama import tiny_llama, tiny_tokenizer

# The tiny tokenizer's ids: <pad> 0, <s> 1, </s> 2, user 4, assistant 5, ":" 7, w<i> 10 + i.
USER, ASSISTANT = [1, 4, 7], [1, 5, 7]  # "<s> user :", "<s> assistant :"
GOOD = '{"prompt": "w1", "completion": "w2"}'

MALFORMED = [
    ("{not json", "not valid JSON"),
    ("", "the line is empty"),
    ("[1, 2]", "expected a JSON object"),
    ('{"text": "w1"}', "neither format; expected"),
    ('{"prompt": 3, "completion": "w1"}', "expected 'prompt' to be a non-empty string"),
    ('{"prompt": "w1"}', "expected 'completion' to be a non-empty string"),
    ('{"prompt": "w1", "completion": ""}', "expected 'completion' to be a non-empty string"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": ["w1"]}]}', "messages[0] must be an object with a string 'role'"),
    ('{"messages": [{"role": "user", "content": "w1"}]}', "no message in 'messages' has role 'assistant'"),
    ('{"messages": [{"role": "assistant", "content": ""}]}', "every assistant message in 'messages' is empty"),
    ('{"messages": [{"role": "user", "content": "w1"}], "prompt": "w1"}', "has both 'messages' and 'prompt'"),
]


@pytest.mark.parametrize("line, words", MALFORMED, ids=[w for _, w in MALFORMED])
def test_a_malformed_line_is_refused_with_its_file_line_and_what_was_expected(tmp_path, line, words):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(ValueError) as caught:
        read_jsonl(path)
    message = str(caught.value)
    assert f"{path}, line 2: " in message and words in message
    assert "messages" in message or "prompt" in message  # says what a line should hold


def test_an_empty_file_and_a_missing_file_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no examples"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")


def tokenized(record: dict, tokenizer=None, max_length: int = 64):
    return tokenize_example(tokenizer or tiny_tokenizer(), parse_line(json.dumps(record), "x"), max_length)


def test_prompt_completion_labels_only_the_completion_and_eos_through_the_chat_template():
    ids, labels = tokenized({"prompt": "w1 w2", "completion": "w3 w4"})
    prompt = USER + [11, 12, 2] + ASSISTANT  # "<s> user : w1 w2 </s> <s> assistant :"
    assert ids == prompt + [13, 14, 2]
    assert labels == [IGNORE] * len(prompt) + [13, 14, 2]
    assert encode_prompt(tiny_tokenizer(), "w1 w2") == prompt  # what generate asks is what was trained


def test_prompt_completion_without_a_chat_template_is_raw_text():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    ids, labels = tokenized({"prompt": "w1 w2", "completion": "w3 w4"}, tokenizer)
    assert ids == [11, 12, 13, 14, 2]
    assert labels == [IGNORE, IGNORE, 13, 14, 2]
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        tokenized({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]},
                  tokenizer)


def test_chat_labels_every_assistant_turn_and_its_end_of_turn_and_nothing_else():
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1"},
                {"role": "assistant", "content": "w2"}, {"role": "user", "content": "w3"},
                {"role": "assistant", "content": "w4 w5"}]
    ids, labels = tokenized({"messages": messages})
    opening = [1, 6, 7, 19, 2] + USER + [11, 2] + ASSISTANT  # "<s> system : w9 </s> <s> user : w1 </s> <s> assistant :"
    between = USER + [13, 2] + ASSISTANT  # "<s> user : w3 </s> <s> assistant :"
    assert ids == opening + [12, 2] + between + [14, 15, 2]
    assert labels == [IGNORE] * len(opening) + [12, 2] + [IGNORE] * len(between) + [14, 15, 2]


def test_max_length_cuts_the_end_and_a_prompt_that_fills_it_is_refused():
    ids, labels = tokenized({"prompt": "w1 w2", "completion": "w3 w4"}, max_length=10)
    assert len(ids) == 10 and labels[-1] == 13
    with pytest.raises(ValueError, match="x: no answer token is left within max_length=9"):
        tokenized({"prompt": "w1 w2", "completion": "w3 w4"}, max_length=9)


@pytest.mark.parametrize("side, ids, mask, positions", [
    ("right", [[11, 12, 13, 0, 0], [11, 12, 13, 14, 15]], [[1, 1, 1, 0, 0], [1] * 5],
     [[0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]),
    ("left", [[0, 0, 11, 12, 13], [11, 12, 13, 14, 15]], [[0, 0, 1, 1, 1], [1] * 5],
     [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]),
])
def test_the_collator_pads_either_side_and_masks_the_padding(side, ids, mask, positions):
    items = [{"input_ids": [11, 12, 13], "labels": [IGNORE, 12, 13]},
             {"input_ids": [11, 12, 13, 14, 15], "labels": [IGNORE, IGNORE, 13, 14, 15]}]
    batch = SFTCollator(pad_token_id=0, padding_side=side)(items)
    assert batch["input_ids"].tolist() == ids
    assert batch["attention_mask"].tolist() == mask
    assert batch["position_ids"].tolist() == positions
    pad = [IGNORE, IGNORE]
    first = [IGNORE, 12, 13] + pad if side == "right" else pad + [IGNORE, 12, 13]
    assert batch["labels"].tolist() == [first, [IGNORE, IGNORE, 13, 14, 15]]


def examples(n: int = 4):
    records = [{"prompt": " ".join(f"w{i + k}" for k in range(i % 3 + 1)), "completion": f"w{i + 20} w{i + 30}"}
               for i in range(n)]
    return [parse_line(json.dumps(r), f"line {i}") for i, r in enumerate(records, 1)]


@pytest.mark.parametrize("method", ["base", "prompt"])
def test_left_and_right_padding_give_each_example_its_loss_alone(method, single_thread):
    model = tiny_llama(initializer_range=0.2)
    if method == "prompt":
        lk.inject(model, lk.PromptConfig(num_tokens=3, init="vocab"))
    data = SFTDataset(examples(), tiny_tokenizer())
    alone = torch.cat([example_losses(model, SFTCollator(0)([item])) for item in data])
    for side in ("right", "left"):
        batched = example_losses(model, SFTCollator(0, side)([data[i] for i in range(len(data))]))
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_the_loss_of_one_example_is_transformers_own_causal_lm_loss(single_thread):
    model = tiny_llama(initializer_range=0.2)
    batch = SFTCollator(0)([SFTDataset(examples(1), tiny_tokenizer())[0]])
    reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(example_losses(model, batch)[0], reference)
