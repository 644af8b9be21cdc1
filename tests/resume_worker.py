"""A training run that a test kills with SIGKILL and resumes: ``python resume_worker.py OUT [HANG_AT_STEP]``.

Under torchrun (RANK/WORLD_SIZE set) it joins a gloo group and trains under DDP or FSDP2 (PARALLEL=fsdp). At step
HANG_AT_STEP every rank writes its pid to OUT.hanging.<rank> and sleeps, so the test can kill it between two state
saves. At the end rank 0 writes OUT.final.pt.
"""
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from distributed_workers import lora_mlp, mlp_config, problem  # noqa: E402
from lorakit.parallel import stop  # noqa: E402
from lorakit.train import train  # noqa: E402


def main(out: str, hang_at: int | None) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = lora_mlp()
    model[1] = nn.Dropout(0.2)  # so the RNG state matters
    if world > 1 and os.environ.get("PARALLEL") == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    steps_run = []

    def on_step(step):
        steps_run.append(step)
        if step == hang_at:
            with open(f"{out}.hanging.{rank}.tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(f"{out}.hanging.{rank}.tmp", f"{out}.hanging.{rank}")  # whole, or not there yet
            time.sleep(600)

    cfg = mlp_config(steps=30, checkpoint_every=4, state_path=out + ".state.pt", resume=True, log_every=1)
    history = train(wrapped, problem(), cfg, on_step=on_step)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"state": state, "losses": history.losses, "steps_run": steps_run}, out + ".final.pt")
    stop()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
