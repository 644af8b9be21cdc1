"""ALS against torch.linalg.svd and torch.svd_lowrank at equal error (issue 21): a rank-r factorisation of a large
seeded matrix (singular values 1/i), float32, each solver at the fewest iterations reaching within 1e-3 of the
optimum's error, interleaved repeats, medians. Writes the ``als_svd`` section of RESULTS.md.

    python benchmarks/als_svd.py [--sizes 1024,2048,4096] [--ranks 16,64] [--repeats 3]
"""
from __future__ import annotations

import argparse

import torch

from _common import machine, write_section
from lorakit.experiments.svd_als import large_matrix, time_at_equal_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--within", type=float, default=1e-3)
    args = parser.parse_args()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        w = large_matrix(size, seed=0)
        for rank in [int(r) for r in args.ranks.split(",")]:
            t = time_at_equal_error(w, rank, args.within, args.repeats)
            rows.append(f"| {size} x {size} | {rank} | {t['optimum']:.4f} | {t['als_sweeps']} | {t['svd_lowrank_niter']} "
                        f"| {t['als_over_svd']:.3f} | {t['als_over_svd_lowrank']:.3f} |")
            print(rows[-1], flush=True)
    write_section("als_svd", "\n".join([
        "## ALS against SVD at equal error (`benchmarks/als_svd.py`)", "",
        f"float32, singular values 1/i, random orthogonal factors; every solver at the fewest iterations within "
        f"{args.within:g} of the optimum's relative error; {args.repeats} interleaved repeats, medians. Machine: {machine()}.", "",
        "| matrix | rank | optimum rel. error | ALS sweeps | svd_lowrank niter | ALS / linalg.svd | ALS / svd_lowrank |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Target: at rank 16 on 4096 x 4096, ALS / linalg.svd < 1; against svd_lowrank the ratio is reported either way."]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
