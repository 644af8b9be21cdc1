"""QLoRA on SmolLM2-135M-Instruct: what keeping training exact after an evaluation costs
(``lorakit.layers.base.keep_4bit_training_exact``), as ratios hook on / hook off, interleaved in one process, medians.

On CPUs with AVX512-BF16, bitsandbytes packs a 4-bit weight for its inference kernel at the first eval forward, and
that kernel has no backward. lorakit's hook puts the standard layout back before training, so every evaluation that
follows training packs again. Rows (r=16 all-linear LoRA on the nf4 base computing in fp32, 4 x 128 gloss tokens):
  training step      forward, loss, backward, AdamW, never evaluated: the hook only checks each layer;
  eval after a step  one training step (not timed), then one no-grad eval forward (timed): with the hook it packs
                     every 4-bit layer again; without it the layers stay packed from the first evaluation, and the
                     training steps between get no gradient below the first 4-bit layer (the bug the hook fixes).

Run: python benchmarks/qlora_eval.py [--repeats 7] [--threads 2] [--no-write]
"""
from __future__ import annotations

import copy
import statistics
import time
from unittest import mock

import torch

from _common import benchmark_parser, interleaved, machine, parse, write_section
from llm_step import base_model, gloss_tokens, step_fn, with_lorakit


def models() -> tuple[dict, torch.Tensor, bool]:
    """Two injected copies of the 4-bit base, with and without the hook; the tokens; whether this CPU packs."""
    base, tokenizer = base_model("4bit")
    on = with_lorakit(copy.deepcopy(base))
    with mock.patch("lorakit.inject.keep_4bit_training_exact", lambda model: None):
        off = with_lorakit(copy.deepcopy(base))
    packs = bool(getattr(base.model.layers[0].self_attn.q_proj, "support_avx512bf16_for_cpu", False))
    return {"hook on": on, "hook off": off}, gloss_tokens(tokenizer, 4, 128), packs


def eval_after_steps(cases: dict, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of the eval forward that follows a training step, the cases taking turns."""
    steps = {name: step_fn(model, ids, False) for name, model in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):  # the first round packs both for the first time: not counted
        for name, model in cases.items():
            model.train()
            steps[name]()
            model.eval()
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids)
            if round_:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=7)
    args = parse(parser)
    cases, ids, packs = models()
    step = interleaved({name: step_fn(model, ids, False) for name, model in cases.items()}, args.repeats, 1, warmup=1)
    evaluation = eval_after_steps(cases, ids, args.repeats)
    rows = [f"| training step, 4 x 128, never evaluated | {step['hook on'] / step['hook off']:.3f} |",
            f"| eval forward after a training step, 4 x 128 | {evaluation['hook on'] / evaluation['hook off']:.3f} |"]
    print("\n".join(rows), f"\nbitsandbytes packs on this CPU: {packs}", flush=True)
    if args.no_write:
        return
    write_section("qlora_eval", "\n".join([
        "## QLoRA: exact training after an evaluation (`benchmarks/qlora_eval.py`)", "",
        f"SmolLM2-135M-Instruct, nf4 base computing in fp32, r=16 all-linear LoRA; lorakit with its hook "
        f"(`keep_4bit_training_exact`) against the same model without it; {args.repeats} interleaved repeats, medians. "
        f"bitsandbytes packs 4-bit weights for its CPU kernel on this machine: {packs}. Machine: {machine()}.", "",
        "| case | hook on / hook off |", "|---|---:|", *rows, "",
        "Without the hook, the training steps after the first evaluation get no gradient below the first 4-bit "
        "layer, so the eval row's baseline is a broken run. The packing happens once per evaluation phase: the later "
        "batches of the same evaluation find the layers packed, so an evaluation of n batches costs about "
        "(ratio - 1) / n more. Keeping the packed layout too would remove it, at one more copy of every 4-bit weight "
        "in memory for the whole run; lorakit keeps the memory."]))


if __name__ == "__main__":
    main()
