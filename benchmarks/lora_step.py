"""Training-step and inference cost of LoRA on the seed MLP (784-1000-2000-10), as ratios measured interleaved.

Training step (forward, cross-entropy, backward, Adam) with LoRA r=8 on all three Linears, against:
  frozen      the same model with only the first bias trainable (the floor: backward still runs through
              every activation);
  peft        Hugging Face PEFT's LoRA, same rank and targets;
  parametrize lorakit's torch.nn.utils.parametrize form.
The same step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (fp32 model, fp32 factors, bf16 matmuls):
lorakit against PEFT and against the frozen model, interleaved in the same run. lorakit's fused path is off
under autocast (it would not compute autocast's products), so this row measures the base-call path.
Inference (no grad, eval): base model vs lorakit merged vs lorakit unmerged.

Run: python benchmarks/lora_step.py [--repeats 15] [--threads N] [--no-write]
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import lorakit as lk
from lorakit.models import richboynet

from _common import interleaved, machine, write_section

TARGETS = ["linear1", "linear2", "linear3"]


def step_fn(model: torch.nn.Module, batch: int, autocast: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = richboynet()
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.linear1.bias.requires_grad_(True)
    module = lk.inject(copy.deepcopy(base), lk.LoRAConfig(rank=8, alpha=16, targets=TARGETS))
    param = lk.inject(copy.deepcopy(base), lk.LoRAConfig(rank=8, alpha=16, targets=TARGETS, mode="parametrize"))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    return {"frozen": frozen, "lorakit": module, "peft": peft, "parametrize": param, "base": base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only (smoke runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = models()
    rows = []
    for batch, inner in ((10, 50), (256, 10)):
        t = interleaved({k: step_fn(m[k], batch) for k in ("frozen", "lorakit", "peft", "parametrize")},
                        args.repeats, inner)
        rows.append(f"| train step, batch {batch} | {t['lorakit'] / t['frozen']:.3f} | {t['lorakit'] / t['peft']:.3f} "
                    f"| {t['peft'] / t['frozen']:.3f} | {t['parametrize'] / t['frozen']:.3f} |")
        print(rows[-1])
    autocast_rows = []
    for batch, inner in ((10, 50), (256, 10)):
        t = interleaved({k: step_fn(m[k], batch, autocast=True) for k in ("frozen", "lorakit", "peft")},
                        args.repeats, inner)
        autocast_rows.append(f"| bf16 autocast step, batch {batch} | {t['lorakit'] / t['frozen']:.3f} "
                             f"| {t['lorakit'] / t['peft']:.3f} | {t['peft'] / t['frozen']:.3f} |")
        print(autocast_rows[-1])
    merged = lk.merge(copy.deepcopy(m["lorakit"]))
    unmerged = m["lorakit"]
    for model in (m["base"], merged, unmerged):
        model.eval()
    x = torch.randn(256, 784)
    with torch.no_grad():
        t = interleaved({"base": lambda: m["base"](x), "merged": lambda: merged(x), "unmerged": lambda: unmerged(x)},
                        args.repeats, 20)
    inference = (f"| inference, batch 256 | merged / base = {t['merged'] / t['base']:.3f} "
                 f"| unmerged / base = {t['unmerged'] / t['base']:.3f} |")
    print(inference)
    if args.no_write:
        return
    write_section("lora_step", "\n".join([
        "## LoRA training step on the seed MLP (`benchmarks/lora_step.py`)", "",
        f"784-1000-2000-10, LoRA r=8 on the three Linears, Adam; {args.repeats} interleaved repeats, medians. "
        f"Machine: {machine()}.", "",
        "| case | lorakit / frozen | lorakit / PEFT | PEFT / frozen | parametrize / frozen |",
        "|---|---:|---:|---:|---:|", *rows, "",
        "Under `torch.autocast(\"cpu\", dtype=torch.bfloat16)` (fp32 model and factors, bf16 matmuls):", "",
        "| case | lorakit / frozen | lorakit / PEFT | PEFT / frozen |", "|---|---:|---:|---:|", *autocast_rows, "",
        "| case | merged | unmerged |", "|---|---:|---:|", inference,
        "", "Targets: lorakit/frozen <= 1.10 at batch 256; lorakit/PEFT <= 0.95 at 256 and <= 1.0 at 10; "
        "merged == base (1.00 +- 0.03); unmerged <= 1.10 x base."]))


if __name__ == "__main__":
    main()
