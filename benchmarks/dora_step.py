"""DoRA's cost, as ratios measured interleaved in one process (medians).

Training step (forward, loss, backward, Adam/AdamW, no dropout) with DoRA against PEFT's DoRA (``use_dora=True``,
same rank and targets) and against lorakit's plain LoRA:
  seed MLP    784-1000-2000-10, r=8 on the three Linears, batch 256;
  SmolLM2     SmolLM2-135M-Instruct, r=16 all-linear, 4 x 128 tokens of WordNet glosses, causal-LM loss.
Inference (no grad, eval, trained-looking adapters): lorakit DoRA merged and unmerged against the base model,
and PEFT's DoRA unmerged against the base (PEFT's default, no ``ENABLE_DORA_CACHING``): the seed MLP at batch
256, SmolLM2's forward of 4 x 128 tokens.

Run: python benchmarks/dora_step.py [--repeats 9] [--threads 2] [--no-write] [--skip-llm]
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import lorakit as lk
from lorakit.models import load_causal_lm, richboynet

from _common import benchmark_parser, interleaved, machine, parse, write_section
from llm_step import gloss_tokens

MLP_TARGETS = ["linear1", "linear2", "linear3"]


def mlp_step(model, x, y):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def llm_step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def variants(base, rank: int, alpha: float, targets) -> dict:
    """lorakit DoRA, lorakit LoRA and PEFT DoRA on copies of ``base``, in train mode."""
    cfg = dict(rank=rank, alpha=alpha, targets=targets)
    return {"lorakit-dora": lk.inject(copy.deepcopy(base), lk.LoRAConfig(**cfg, dora=True)).train(),
            "lorakit-lora": lk.inject(copy.deepcopy(base), lk.LoRAConfig(**cfg)).train(),
            "peft-dora": get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                                        lora_dropout=0.0, use_dora=True)).train()}


def randomised(model) -> None:
    """Trained-looking adapters (B is zero at the start); the magnitudes stay as they start."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def inference_cases(base, rank: int, alpha: float, targets, run) -> dict:
    ours = lk.inject(copy.deepcopy(base), lk.LoRAConfig(rank=rank, alpha=alpha, targets=targets, dora=True))
    randomised(ours)
    merged = lk.merge(copy.deepcopy(ours))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                            use_dora=True))
    randomised(theirs)
    models = {"base": copy.deepcopy(base), "unmerged": ours, "merged": merged, "peft": theirs}
    return {k: run(m.eval()) for k, m in models.items()}


def ratios(train: dict, infer: dict) -> str:
    return (f"{train['lorakit-dora'] / train['peft-dora']:.3f} | {train['lorakit-dora'] / train['lorakit-lora']:.3f} "
            f"| {infer['merged'] / infer['base']:.3f} | {infer['unmerged'] / infer['base']:.3f} "
            f"| {infer['peft'] / infer['base']:.3f}")


def mlp_row(repeats: int) -> str:
    torch.manual_seed(0)
    base = richboynet()
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    train = interleaved({k: mlp_step(m, x, y) for k, m in variants(base, 8, 16, MLP_TARGETS).items()}, repeats, 5)
    with torch.no_grad():
        infer = interleaved(inference_cases(base, 8, 16, MLP_TARGETS, lambda m: (lambda: m(x))), repeats, 20)
    return f"| seed MLP, batch 256, r=8 | {ratios(train, infer)} |"


def llm_row(repeats: int) -> str:
    base, tokenizer = load_causal_lm("smollm2")
    ids = gloss_tokens(tokenizer, 4, 128)
    train = interleaved({k: llm_step(m, ids) for k, m in variants(base, 16, 32, "all-linear").items()},
                        repeats, 1, warmup=1)
    with torch.no_grad():
        infer = interleaved(inference_cases(base, 16, 32, "all-linear", lambda m: (lambda: m(input_ids=ids))),
                            repeats, 1, warmup=1)
    return f"| SmolLM2-135M, 4 x 128, r=16 all-linear | {ratios(train, infer)} |"


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=9)
    parser.add_argument("--skip-llm", action="store_true", help="the seed MLP only")
    args = parse(parser)
    rows = [mlp_row(args.repeats)]
    print(rows[-1], flush=True)
    if not args.skip_llm:
        rows.append(llm_row(args.repeats))
        print(rows[-1], flush=True)
    if args.no_write:
        return
    write_section("dora_step", "\n".join([
        "## DoRA training step and inference (`benchmarks/dora_step.py`)", "",
        f"No dropout; Adam (MLP) / AdamW (SmolLM2); {args.repeats} interleaved repeats, medians. Inference: eval, no "
        f"grad, B randomised as after training; PEFT without `ENABLE_DORA_CACHING` (its default). Machine: {machine()}.",
        "", "| model | step: lorakit-DoRA / PEFT-DoRA | step: lorakit-DoRA / lorakit-LoRA | infer: merged / base "
        "| infer: unmerged / base | infer: PEFT unmerged / base |", "|---|---:|---:|---:|---:|---:|", *rows, "",
        "Targets: step lorakit-DoRA/PEFT-DoRA <= 0.8 and lorakit-DoRA/lorakit-LoRA <= 1.25; inference merged/base "
        "1.00 +- 0.03, unmerged/base <= 1.15."]))


if __name__ == "__main__":
    main()
