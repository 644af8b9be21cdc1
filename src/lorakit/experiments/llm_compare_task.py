"""llm-compare's task: WordNet supersenses asked of a causal LM as an instruction, answered by generation.

The data are peft-compare's (:func:`.text_task.load_data`, :func:`.text_task.split_validation`): the same split and
the same stratified test examples. An example ``"<lemma>: <gloss>"`` with label ``noun.animal`` becomes

    user:      Which WordNet noun category does this word belong to, in this sense? Answer with one of:
               noun.animal, noun.artifact, ... .
               Word: <lemma>
               Gloss: <the gloss's definition, before its quoted examples>
    assistant: noun.animal

Every row (zero-shot too) is asked the same instruction, with the category list, through the chat template; the
greedy generation is scored by :func:`exact_match`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.chat import encode_prompt

GLOSS_CHARACTERS = 200  # a gloss is cut to its definition, and to this many characters, to bound the prompt


def instruction(text: str, label_names) -> str:
    """The user turn for one WordNet example ``"<lemma>: <gloss>"``."""
    lemma, _, gloss = text.partition(": ")
    definition = gloss.split('; "')[0].strip()[:GLOSS_CHARACTERS]
    return ("Which WordNet noun category does this word belong to, in this sense? Answer with one of: "
            f"{', '.join(label_names)}.\nWord: {lemma}\nGloss: {definition}")


def prompts_and_answers(data) -> tuple[list[str], list[str]]:
    """``(prompts, answers)`` of a :class:`~lorakit.data.text.TextDataset`."""
    return ([instruction(t, data.label_names) for t in data.texts],
            [data.label_names[label] for label in data.labels])


def stratified_subset(data, size: int | None):
    """The first ``size // classes`` examples of each class, in data order (all of them when ``size`` is None)."""
    from ..data.text import TextDataset

    if size is None or size >= len(data):
        return data
    per_class = size // len(data.label_names)
    if per_class < 1:
        raise ValueError(f"--test-size {size} is below one example per class ({len(data.label_names)} classes)")
    taken = [0] * len(data.label_names)
    keep = []
    for i, label in enumerate(data.labels):
        if taken[label] < per_class:
            keep.append(i)
            taken[label] += 1
    ids = [data.ids[i] for i in keep] if data.ids else []
    return TextDataset([data.texts[i] for i in keep], [data.labels[i] for i in keep], data.label_names, ids)


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


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions of ``prompts`` (chat template), in batches padded on the left; new tokens only."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            longest = max(len(i) for i in ids)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(i)) + i for i in ids], device=device)
            mask = torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def score(model, tokenizer, data, batch_size: int = 16, keep: int = 5) -> dict:
    """Exact-match accuracy (%) of ``model`` on ``data``, per class too, and the first ``keep`` generations."""
    prompts, answers = prompts_and_answers(data)
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in set(answers))
    generated = generate_answers(model, tokenizer, prompts, longest + 2, batch_size)
    right = [exact_match(g, a) for g, a in zip(generated, answers)]
    per_class = {}
    for c, name in enumerate(data.label_names):
        mine = [r for r, label in zip(right, data.labels) if label == c]
        per_class[name] = 100.0 * sum(mine) / len(mine) if mine else None
    return {"accuracy": 100.0 * sum(right) / len(right), "n": len(right), "per_class_accuracy": per_class,
            "examples": [{"prompt": p, "answer": a, "generated": g, "correct": r}
                         for p, a, g, r in list(zip(prompts, answers, generated, right))[:keep]]}
