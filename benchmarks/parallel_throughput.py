"""Training samples per second with 1 process vs 2 (torchrun, gloo, DDP) on this machine, interleaved.

Each round runs a fresh 1-process job and a fresh 2-process job (order alternating) that train RichBoyNet on real
MNIST through ``lorakit.train`` with the same global batch; a job times its steps after a warm-up and reports
samples per second. The table gives the medians and the ratio 2-process / 1-process, measured as it came out:
on 2 shared CPU cores gloo's all-reduce and the second process's own threads may well eat the gain.

Run: python benchmarks/parallel_throughput.py [--rounds 5] [--steps 60] [--batch 64] [--no-write]
     (the worker: torchrun ... benchmarks/parallel_throughput.py --worker ...)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from _common import machine, write_section


def worker(steps: int, warmup: int, batch: int, parallel: str) -> None:
    import torch

    from lorakit import parallel as par
    from lorakit.data.vision import load_mnist, to_float
    from lorakit.models import richboynet
    from lorakit.train import TrainConfig, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, world = par.start(parallel)
    images, labels = load_mnist(None, "train")
    data = (to_float(images, 0.1307, 0.3081).unsqueeze(1), labels)
    torch.manual_seed(0)
    model = richboynet()
    times = []
    train(par.wrap(model, parallel), data, TrainConfig(batch_size=batch, steps=steps, progress=False),
          on_step=lambda step: times.append(time.perf_counter()))
    if rank == 0:
        seconds = times[-1] - times[warmup - 1]
        print(json.dumps({"samples_per_second": batch * (steps - warmup) / seconds, "world": world}))
    if world > 1:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(world: int, args) -> float:
    here = os.path.abspath(__file__)
    flags = ["--worker", "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    if world == 1:
        command = [sys.executable, here, *flags, "--parallel", "none"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), here, *flags, "--parallel", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="global batch size (split across processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.warmup, args.batch, args.parallel)
    rates = {1: [], 2: []}
    for r in range(args.rounds):
        for world in ((1, 2) if r % 2 == 0 else (2, 1)):
            rates[world].append(job(world, args))
            print(f"round {r + 1}: {world} process(es): {rates[world][-1]:.0f} samples/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    ratios = [b / a for a, b in zip(rates[1], rates[2])]
    table = "\n".join([
        "## Training throughput: 1 process vs 2 (torchrun, gloo, DDP)", "",
        f"`python benchmarks/parallel_throughput.py --rounds {args.rounds} --steps {args.steps} --batch {args.batch} "
        f"--threads {args.threads}`; RichBoyNet on real MNIST, global batch {args.batch}, {args.threads} thread(s) per "
        f"process, {args.rounds} interleaved rounds of fresh jobs; {machine()}.", "",
        "| processes | samples/s (median) | ratio to 1 process (median of rounds) | ratio range |", "|---|---:|---:|---|",
        f"| 1 | {one:.0f} | 1.00 | |",
        f"| 2 | {two:.0f} | {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |"])
    print(table)
    if not args.no_write:
        write_section("parallel_throughput", table)


if __name__ == "__main__":
    main()
