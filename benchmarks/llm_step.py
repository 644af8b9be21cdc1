"""LoRA on SmolLM2-135M-Instruct (Llama, 30 layers): training step, generate() and mixed-adapter batches, as
ratios measured interleaved in one process (medians).

Training step (forward, causal-LM loss, backward, AdamW) on WordNet glosses, LoRA r=16 all-linear (alpha 32,
no dropout):
  fp32            lorakit against PEFT and against the frozen floor (the base with only the first layer's norm
                  trainable, so backward still runs through every activation);
  bf16 autocast   fp32 model and factors under torch.autocast("cpu", dtype=torch.bfloat16), 1 x 32 tokens;
  4-bit QLoRA     bitsandbytes nf4 base computing in fp32, fp32 factors.
Peak memory: what 2 training steps add to the resident set over the loaded, injected model, in a fresh process.
generate(): batch 4, 32 new tokens (greedy, no early stop): lorakit unmerged / merged against the base, PEFT
unmerged against the base. Mixed batches: 4 adapters at batch 8, forward of 8 x 128 tokens and generate() of
8 x 32 prompt tokens + 16 new tokens; lorakit ``mixed_batch`` and PEFT ``adapter_names=`` against each one's
single-adapter time, and lorakit against PEFT.

Run: python benchmarks/llm_step.py [--repeats 7] [--threads 2] [--no-write]
"""
from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lorakit as lk
from lorakit.data.text import read_wordnet_nouns
from lorakit.models import load_causal_lm

from _common import benchmark_parser, interleaved, machine, parse, write_section

RANK, ALPHA = 16, 32
# bf16 matmuls on a CPU without bf16 units run ~40x slower than fp32 (a 4 x 128 step: 130 s against 3.4 s), so the
# bf16 row uses 1 x 32 tokens and 3 repeats; QLoRA's base computes in fp32 here for the same reason.
SETTINGS = {"fp32": dict(batch=4, length=128), "bf16 autocast": dict(autocast=True, batch=1, length=32, repeats=3),
            "4-bit QLoRA": dict(quantize="4bit", batch=4, length=128)}


def gloss_tokens(tokenizer, batch: int, length: int) -> torch.Tensor:
    """``batch`` rows of ``length`` tokens from WordNet's noun glosses (real text, as a fine-tuning run sees)."""
    text = " ".join(s.gloss for s in read_wordnet_nouns()[: 20 * batch * length // 10])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids[: batch * length].view(batch, length)


def base_model(quantize: str | None = None):
    return load_causal_lm("smollm2", quantize=quantize)  # float32 (QLoRA: nf4 storage, float32 compute)


def with_lorakit(model, name="default"):
    return lk.inject(model, lk.LoRAConfig(rank=RANK, alpha=ALPHA, targets="all-linear"), name=name)


def with_peft(model):
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0))


def frozen_floor(model):
    model.requires_grad_(False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    return model


def step_fn(model, ids: torch.Tensor, autocast: bool = False):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peak_memory_mb(setting: str, library: str) -> float:
    """Peak memory a training step adds over the loaded model, in a fresh process (see :func:`_peak_child`)."""
    code = (f"import sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); import llm_step; "
            f"llm_step._peak_child({setting!r}, {library!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _peak_child(setting: str, library: str) -> None:
    """Load, inject, then 2 steps while a thread samples the resident set every 2 ms: print the peak over the start."""
    import threading

    import psutil

    options = SETTINGS[setting]
    model, tokenizer = base_model(options.get("quantize"))
    model = with_lorakit(model) if library == "lorakit" else with_peft(model)
    step = step_fn(model, gloss_tokens(tokenizer, options["batch"], options["length"]), options.get("autocast", False))
    process, done, peak = psutil.Process(), threading.Event(), [0]
    start = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mb": (peak[0] - start) / 2**20}))


def training_rows(repeats: int) -> list[str]:
    rows = []
    for setting, options in SETTINGS.items():
        base, tokenizer = base_model(options.get("quantize"))
        ids = gloss_tokens(tokenizer, options["batch"], options["length"])
        models = {"lorakit": with_lorakit(copy.deepcopy(base)), "peft": with_peft(copy.deepcopy(base))}
        if not options.get("quantize"):
            models["frozen"] = frozen_floor(copy.deepcopy(base))
        del base
        t = interleaved({k: step_fn(m, ids, options.get("autocast", False)) for k, m in models.items()},
                        min(repeats, options.get("repeats", repeats)), 1, warmup=1)
        memory = {lib: peak_memory_mb(setting, lib) for lib in ("lorakit", "peft")}
        floor = f"{t['lorakit'] / t['frozen']:.3f}" if "frozen" in t else "n/a"
        rows.append(f"| {setting}, {options['batch']} x {options['length']} | {t['lorakit'] / t['peft']:.3f} | {floor} | {memory['lorakit']:.0f} "
                    f"| {memory['peft']:.0f} |")
        print(rows[-1], flush=True)
        del models
    return rows


def randomised(model) -> None:
    """Trained-looking adapters: B is zero at the start, which would make every row equal to the base."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)


def generate_fn(model, ids: torch.Tensor, new_tokens: int):
    def run():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return run


def generate_row(repeats: int) -> str:
    loaded, tokenizer = base_model()
    base = copy.deepcopy(loaded)  # every case a copy: the loaded weights' memory layout is not a copy's
    ids = gloss_tokens(tokenizer, 4, 32)
    unmerged = with_lorakit(copy.deepcopy(loaded))
    randomised(unmerged)
    merged = lk.merge(copy.deepcopy(unmerged))
    peft = with_peft(copy.deepcopy(loaded))
    randomised(peft)
    models = {"base": base, "unmerged": unmerged, "merged": merged, "peft": peft}
    with torch.no_grad():
        t = interleaved({k: generate_fn(m.eval(), ids, 32) for k, m in models.items()}, repeats, 1, warmup=1)
    row = (f"| generate, batch 4, 32 new tokens | {t['unmerged'] / t['base']:.3f} | {t['merged'] / t['base']:.3f} "
           f"| {t['peft'] / t['base']:.3f} |")
    print(row, flush=True)
    return row


NAMES = ["a", "b", "c", "d"]


def mixed_rows(repeats: int, tmp: str) -> list[str]:
    base, tokenizer = base_model()
    ours = copy.deepcopy(base)
    for name in NAMES:
        with_lorakit(ours, name)
    randomised(ours)
    for name in NAMES:
        lk.save_adapter(ours, f"{tmp}/{name}", name=name)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/a", adapter_name="a")
    for name in NAMES[1:]:
        theirs.load_adapter(f"{tmp}/{name}", adapter_name=name)
    ours.eval(), theirs.eval()
    lk.set_active(ours, "a")
    rows = NAMES * 2
    forward_ids, prompt_ids = gloss_tokens(tokenizer, 8, 128), gloss_tokens(tokenizer, 8, 32)

    def ours_mixed(run):
        def call():
            with lk.mixed_batch(ours, rows):
                run()
        return call

    cases = {
        "forward": (lambda m, **kw: (lambda: m(input_ids=forward_ids, **kw))),
        "generate": (lambda m, **kw: (lambda: m.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(
            prompt_ids), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, **kw))),
    }
    out = []
    with torch.no_grad():
        for case, make in cases.items():
            t = interleaved({"ours single": make(ours), "ours mixed": ours_mixed(make(ours)),
                             "peft single": make(theirs), "peft mixed": make(theirs, adapter_names=rows)},
                            repeats, 1, warmup=1)
            out.append(f"| mixed {case}, batch 8, 4 adapters | {t['ours mixed'] / t['ours single']:.3f} "
                       f"| {t['peft mixed'] / t['peft single']:.3f} | {t['ours mixed'] / t['peft mixed']:.3f} |")
            print(out[-1], flush=True)
    return out


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=7)
    args = parse(parser)
    import tempfile

    train = training_rows(args.repeats)
    generate = generate_row(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        mixed = mixed_rows(args.repeats, tmp)
    if args.no_write:
        return
    write_section("llm_step", "\n".join([
        "## LoRA on SmolLM2-135M-Instruct (`benchmarks/llm_step.py`)", "",
        f"r=16 all-linear, alpha 32; training step on WordNet glosses, AdamW; {args.repeats} "
        f"interleaved repeats, medians. Peak MB: what 2 steps (the first creates AdamW's state) add to the resident "
        f"set over the loaded model, in a fresh process. Machine: {machine()}.", "",
        "| training step | lorakit / PEFT | lorakit / frozen floor | peak MB lorakit | peak MB PEFT |",
        "|---|---:|---:|---:|---:|", *train, "",
        "| case | lorakit unmerged / base | lorakit merged / base | PEFT unmerged / base |",
        "|---|---:|---:|---:|", generate, "",
        "| case | lorakit mixed / lorakit single | PEFT mixed / PEFT single | lorakit mixed / PEFT mixed |",
        "|---|---:|---:|---:|", *mixed, "",
        "Targets: fp32 lorakit/PEFT <= 0.85 and lorakit/floor <= 1.07; bf16 lorakit/PEFT <= 0.90; QLoRA "
        "lorakit/PEFT <= 0.95; generate unmerged/base <= 1.05, merged/base 1.00 +- 0.03; mixed/single <= 1.05 in "
        "forward and generate(); mixed generate() lorakit/PEFT <= 0.75."]))


if __name__ == "__main__":
    main()
