"""``lorakit generate``: a causal LM (optionally with an adapter) answers each prompt; the answers are printed.

    lorakit generate --model smollm2 --adapter runs/ft "What is the capital of France?"

A prompt is asked as :func:`lorakit.data.chat.encode_prompt` writes it, the way ``lorakit finetune`` trained it:
one user turn of the chat template when the tokenizer has one (``--no-chat``: the raw text). Decoding is greedy
unless ``--temperature`` is above 0. ``--adapter`` takes a folder written by lorakit or PEFT
(:func:`lorakit.load_adapter`); one made for another base model is refused, naming the layer or shape that differs.
"""
from __future__ import annotations

import argparse

import torch

DESCRIPTION = "print a causal LM's completion of each prompt (optionally with a lorakit or PEFT adapter)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local causal-LM folder")
    parser.add_argument("--adapter", default=None, help="a lorakit or PEFT adapter folder for this model")
    parser.add_argument("--quantize", choices=["4bit", "8bit"], default=None, help="load the base quantised")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, not the chat template")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample at this temperature")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling (with --temperature > 0)")


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True,
             temperature: float = 0.0, seed: int = 0) -> str:
    """``model``'s answer to ``prompt`` (the new tokens only, decoded without special tokens)."""
    from ..data.chat import encode_prompt

    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt, chat)], device=device)  # (1, T)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(args: argparse.Namespace) -> int:
    from .. import load_adapter
    from ..models.llm import load_causal_lm

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_causal_lm(args.model, quantize=args.quantize)
    if args.adapter is not None:
        load_adapter(model, args.adapter)
    for i, prompt in enumerate(args.prompts):
        text = complete(model, tokenizer, prompt, args.max_new_tokens, not args.no_chat, args.temperature, args.seed)
        print(("\n" if i else "") + text.strip(), flush=True)
    return 0
