"""Inference of compressed vs dense models, as ratios measured interleaved in one process (medians).

The seed's Fashion-MNIST MLP (784-256-128-10) with fc1 and fc2 as rank-r ``LowRankLinear`` layers (what both
``lorakit.compress`` after C-LoRA and ``lorakit.svd_compress`` produce), against the dense model; and the small
VGG-style CNN with its convolutions as rank-r ``LowRankConv2d``. No grad, eval mode, batch 1 and 1024.

Run: python benchmarks/compress_infer.py [--repeats 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy

import torch

import lorakit as lk
from lorakit.models import fmnist_mlp, vgg_small

from _common import interleaved, machine, write_section

CONVS = ["features.conv1_2", "features.conv2_1", "features.conv2_2"]


def cases() -> list[tuple[str, torch.nn.Module, torch.nn.Module, tuple[int, ...], int]]:
    """(name, dense, compressed, input shape without batch, rank)."""
    torch.manual_seed(0)
    mlp = fmnist_mlp().eval()
    out = [(f"MLP, rank {r}", mlp, lk.svd_compress(copy.deepcopy(mlp), rank=r, targets=["fc1", "fc2"]).eval(),
            (784,), r) for r in (16, 32, 64)]
    cnn = vgg_small().eval()
    out.append(("VGG-small convs, rank 8", cnn, lk.svd_compress(copy.deepcopy(cnn), rank=8, targets=CONVS).eval(),
                (1, 28, 28), 8))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, dense, compressed, shape, rank in cases():
        params = (sum(p.numel() for p in compressed.parameters()), sum(p.numel() for p in dense.parameters()))
        cells = []
        for batch, inner in ((1, 200), (1024, 5 if len(shape) == 1 else 1)):
            x = torch.randn(batch, *shape)
            with torch.no_grad():
                t = interleaved({"dense": lambda: dense(x), "compressed": lambda: compressed(x)}, args.repeats, inner)
            cells.append(t["compressed"] / t["dense"])
        rows.append(f"| {name} | {params[0] / params[1]:.3f} | {cells[0]:.3f} | {cells[1]:.3f} |")
        print(rows[-1], flush=True)
    write_section("compress_infer", "\n".join([
        "## Compressed vs dense inference (`benchmarks/compress_infer.py`)", "",
        f"Time of the compressed model / time of the dense one (< 1: compressed is faster); no grad, eval; "
        f"{args.repeats} interleaved repeats, medians. Machine: {machine()}.", "",
        "| model | parameters compressed / dense | batch 1 | batch 1024 |", "|---|---:|---:|---:|", *rows, "",
        "Target: the rank-16 compressed MLP runs faster than the dense one at batch 1024 (ratio < 1)."]))


if __name__ == "__main__":
    main()
