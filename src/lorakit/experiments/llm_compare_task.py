"""llm-compare's task: WordNet supersenses asked of a causal LM as an instruction, answered by generation.

The data are peft-compare's (:func:`.text_task.load_data`, :func:`.text_task.split_validation`): the same split and
the same stratified test examples. An example ``"<lemma>: <gloss>"`` with label ``noun.animal`` becomes

    user:      Which WordNet noun category does this word belong to, in this sense?
               [zero-shot only: Answer with one of: noun.animal, noun.artifact, ... .]
               Word: <lemma>
               Gloss: <the gloss's definition, before its quoted examples>
    assistant: noun.animal

through the chat template. The zero-shot row is told the categories (it could not guess their names); a trained
row learns them from its training answers, so its prompts, in training and in scoring alike, leave the list out:
a third fewer tokens per example, which is most of what a step and a scoring cost. The greedy generation is
scored by :func:`exact_match`.

Scoring shares work between prompts: every prompt starts with the same tokens (the template's system turn and
the question), whose keys and values are computed once and reused by every batch (:func:`generate_answers`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..data.chat import encode_prompt

GLOSS_CHARACTERS = 200  # a gloss is cut to its definition, and to this many characters, to bound the prompt


def instruction(text: str, label_names, choices: bool = False) -> str:
    """The user turn for one WordNet example ``"<lemma>: <gloss>"``; with ``choices``, the category list too."""
    lemma, _, gloss = text.partition(": ")
    definition = gloss.split('; "')[0].strip()[:GLOSS_CHARACTERS]
    listed = f" Answer with one of: {', '.join(label_names)}." if choices else ""
    return (f"Which WordNet noun category does this word belong to, in this sense?{listed}\nWord: {lemma}\n"
            f"Gloss: {definition}")


def prompts_and_answers(data, choices: bool = False) -> tuple[list[str], list[str]]:
    """``(prompts, answers)`` of a :class:`~lorakit.data.text.TextDataset` (``choices``: see :func:`instruction`)."""
    return ([instruction(t, data.label_names, choices) for t in data.texts],
            [data.label_names[label] for label in data.labels])


def stratified_subset(data, size: int | None):
    """The first ``size // classes`` examples of each class, in data order (all of them when ``size`` is None)."""
    if size is None or size >= len(data):
        return data
    per_class = size // len(data.label_names)
    if per_class < 1:
        raise ValueError(f"--test-size {size} is below one example per class ({len(data.label_names)} classes)")
    return data.first_per_class(per_class)[0]


def write_jsonl(path: Path, data) -> Path:
    """``data`` as ``lorakit finetune``'s prompt/completion JSONL."""
    prompts, answers = prompts_and_answers(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for prompt, answer in zip(prompts, answers):
            f.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")
    return path


def exact_match(generated: str, answer: str) -> bool:
    """The score of one generation: equal to the answer once surrounding white space is stripped."""
    return generated.strip() == answer.strip()


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest run of tokens that starts every sequence, less one token: each keeps something to feed."""
    shortest = min(len(ids) for ids in sequences)
    length = next((i for i in range(shortest) if len({ids[i] for ids in sequences}) > 1), shortest)
    return sequences[0][:max(length - 1, 0)]


def _prefix_cache(model, prefix: torch.Tensor):
    """``(keyword, cache)`` of ``prefix``'s keys and values: transformers 5 calls it ``cache``, 4 ``past_key_values``."""
    out = model(input_ids=prefix, use_cache=True)
    name = "cache" if "cache" in out else "past_key_values"
    return name, out[name]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                     share_prefix: bool = True) -> list[str]:
    """Greedy completions of ``prompts`` (chat template), new tokens only, ``batch_size`` prompts at a time.

    With ``share_prefix`` the tokens every prompt starts with are run once; each batch continues from a copy of
    their cache, its prompts' own tokens padded on the left of the part that differs (``prefix, pads, own``; the
    mask hides the pads and positions count only real tokens, so each prompt is computed as if alone). A model that
    puts something before the text (a soft prompt) needs ``share_prefix=False``: all of each prompt, left-padded.
    """
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    prefix = common_prefix(encoded) if share_prefix else []
    was_training = model.training
    model.eval()
    answers = []
    try:
        cache_name, cache = _prefix_cache(model, torch.tensor([prefix], device=device)) if prefix else (None, None)
        for start in range(0, len(prompts), batch_size):
            own = [ids[len(prefix):] for ids in encoded[start:start + batch_size]]
            longest = max(len(i) for i in own)
            pads = [longest - len(i) for i in own]
            input_ids = torch.tensor([prefix + [tokenizer.pad_token_id] * n + i for n, i in zip(pads, own)],
                                     device=device)
            mask = torch.tensor([[1] * len(prefix) + [0] * n + [1] * len(i) for n, i in zip(pads, own)], device=device)
            extra = {}
            if cache is not None:
                extra[cache_name] = copy.deepcopy(cache)
                extra[cache_name].batch_repeat_interleave(len(own))
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id, **extra)
            answers += tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def score(model, tokenizer, data, batch_size: int = 16, keep: int = 5, choices: bool = False,
          share_prefix: bool = True) -> dict:
    """Exact-match accuracy (%) of ``model`` on ``data``, per class too, and the first ``keep`` generations
    (``choices``: see :func:`instruction`; ``share_prefix``: see :func:`generate_answers`)."""
    prompts, answers = prompts_and_answers(data, choices)
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in set(answers))
    generated = generate_answers(model, tokenizer, prompts, longest + 2, batch_size, share_prefix)
    right = [exact_match(g, a) for g, a in zip(generated, answers)]
    per_class = {}
    for c, name in enumerate(data.label_names):
        mine = [r for r, label in zip(right, data.labels) if label == c]
        per_class[name] = 100.0 * sum(mine) / len(mine) if mine else None
    return {"accuracy": 100.0 * sum(right) / len(right), "n": len(right), "per_class_accuracy": per_class,
            "examples": [{"prompt": p, "answer": a, "generated": g, "correct": r}
                         for p, a, g, r in list(zip(prompts, answers, generated, right))[:keep]]}
