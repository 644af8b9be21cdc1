"""Instruction-tuning data: JSONL in TRL's two conventions, tokenised with the loss on the answers only.

One JSON object per line, either

- chat: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}``;
  the tokenizer's chat template renders it, and the loss covers every assistant turn (its text and the template's
  end-of-turn marks), nothing else;
- prompt/completion: ``{"prompt": "...", "completion": "..."}``; the prompt goes through the chat template as one
  user turn when the tokenizer has a template (else it is used raw), and the loss covers the completion's tokens
  followed by the end-of-sequence token.

Other keys are ignored. :func:`read_jsonl` checks every line before anything is tokenised; a malformed one is a
``ValueError`` naming the file, the line and what was expected. :func:`tokenize_example` gives ``(input_ids,
labels)`` with ``labels`` -100 where no loss is taken; :class:`SFTCollator` pads a batch (right or left) and
masks the padding the same way. :func:`encode_prompt` is the prompt half alone, as ``generate`` sees it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .text import json_object

IGNORE = -100  # the label of a position that takes no loss (PyTorch's cross_entropy ignore_index)
FORMATS = ('{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": "...", "completion": "..."}')


@dataclass
class Example:
    """One checked line: ``messages`` (chat) or ``prompt`` and ``completion``; ``where`` is "file, line N"."""

    where: str
    messages: list[dict] | None = None
    prompt: str | None = None
    completion: str | None = None


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                         f"objects, got {json.dumps(messages)[:60]}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be an object with a string 'role' and a string "
                             f"'content', got {json.dumps(message)[:60]}")
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise ValueError(f"{where}: no message in 'messages' has role 'assistant', so there is nothing to learn; "
                         "expected at least one assistant turn")
    if not any(m["content"] for m in answers):
        raise ValueError(f"{where}: every assistant message in 'messages' is empty; expected an answer to learn")
    return messages


def parse_line(line: str, where: str) -> Example:
    """One JSONL line as an :class:`Example`; a ``ValueError`` naming ``where`` and what was expected otherwise."""
    if not line.strip():
        raise ValueError(f"{where}: the line is empty; expected one JSON object per line: {FORMATS}")
    record = json_object(line, where, f"a JSON object {FORMATS}")
    chat, paired = "messages" in record, "prompt" in record or "completion" in record
    if chat and paired:
        raise ValueError(f"{where}: has both 'messages' and 'prompt'/'completion'; expected one format: {FORMATS}")
    if chat:
        return Example(where, messages=_check_messages(record["messages"], where))
    if not paired:
        raise ValueError(f"{where}: neither format; expected {FORMATS}, found the keys {sorted(record)}")
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise ValueError(f"{where}: expected {key!r} to be a non-empty string, as in {{\"prompt\": \"...\", "
                             f"\"completion\": \"...\"}}; got {json.dumps(record.get(key))[:60]}")
    return Example(where, prompt=record["prompt"], completion=record["completion"])


def read_jsonl(path: str | Path) -> list[Example]:
    """Every line of ``path``, checked (see the module docstring); an empty file is refused too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    with open(path, encoding="utf-8") as f:
        examples = [parse_line(line, f"{path}, line {number}") for number, line in enumerate(f, 1)]
    if not examples:
        raise ValueError(f"{path}: no examples; expected one JSON object per line: {FORMATS}")
    return examples


# -- tokenising ----------------------------------------------------------------------------------
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """The token ids of ``prompt`` as the model is asked it: one user turn of the chat template and the assistant's
    opening when ``chat`` and the tokenizer has a template (the template writes its own special tokens), else the
    raw text with the tokenizer's usual special tokens."""
    if chat and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return _ids(tokenizer, text, special=False)
    return _ids(tokenizer, prompt, special=True)


def _opening(render, messages: list[dict]) -> str:
    """The template's text for ``messages`` and the opening of the assistant's turn after them."""
    try:
        return render(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render no messages at all: nothing precedes the turn
        if messages:
            raise
        return ""


def _chat_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_answer)`` pieces: each assistant turn is the text that
    rendering it adds after the template's opening of that turn."""
    render = tokenizer.apply_chat_template
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        opened = _opening(render, messages[:i])
        answered = render(messages[:i + 1], tokenize=False)
        if not opened.startswith(done) or not answered.startswith(opened):
            raise ValueError(f"{where}: the tokenizer's chat template does not render this conversation "
                             "turn by turn (an earlier turn renders differently once later ones follow), so the "
                             "assistant turns cannot be told apart; expected a template that only appends")
        segments += [(opened[len(done):], False), (answered[len(opened):], True)]
        done = answered
    return segments


def tokenize_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``example``, cut to ``max_length`` tokens; labels are the ids where the loss is
    taken and :data:`IGNORE` elsewhere. An example left with no answer token after the cut is refused."""
    if example.messages is not None:
        if not has_chat_template(tokenizer):
            raise ValueError(f"{example.where}: chat 'messages' need a tokenizer with a chat template, and this one "
                             "has none; write the data as {\"prompt\": ..., \"completion\": ...} instead")
        pieces = [(_ids(tokenizer, text, special=False), answer)
                  for text, answer in _chat_segments(tokenizer, example.messages, example.where)]
    else:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token to end a completion with")
        completion = _ids(tokenizer, example.completion, special=False) + [tokenizer.eos_token_id]
        pieces = [(encode_prompt(tokenizer, example.prompt), False), (completion, True)]
    input_ids = [i for ids, _ in pieces for i in ids][:max_length]
    labels = [i if answer else IGNORE for ids, answer in pieces for i in ids][:max_length]
    if all(label == IGNORE for label in labels):
        raise ValueError(f"{example.where}: no answer token is left within max_length={max_length} (the prompt "
                         "takes them all); expected a shorter prompt or a larger --max-length")
    return input_ids, labels


class SFTDataset(torch.utils.data.Dataset):
    """Tokenised examples; item ``i`` is ``{"input_ids": [...], "labels": [...]}`` (lists of ints)."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int = 512) -> None:
        self.items = [dict(zip(("input_ids", "labels"), tokenize_example(tokenizer, e, max_length)))
                      for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@dataclass
class SFTCollator:
    """``collate_fn`` for :class:`SFTDataset`: pads to the longest example on ``padding_side``.

    Gives ``input_ids``, ``attention_mask`` (0 on padding), ``labels`` (:data:`IGNORE` on padding) and
    ``position_ids`` counted over the real tokens only, so a left-padded row sees the positions it would alone;
    all of shape (B, T).
    """

    pad_token_id: int
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)

        def padded(values: list[int], fill: int) -> list[int]:
            pad = [fill] * (longest - len(values))
            return values + pad if self.padding_side == "right" else pad + values

        mask = torch.tensor([padded([1] * len(item["input_ids"]), 0) for item in items])
        return {
            "input_ids": torch.tensor([padded(item["input_ids"], self.pad_token_id) for item in items]),
            "attention_mask": mask,
            "labels": torch.tensor([padded(item["labels"], IGNORE) for item in items]),
            "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
        }
