"""A run killed with SIGKILL between two state saves, resumed with --resume, ends as if never stopped.

One process: bit-identical. Two processes (torchrun, gloo, DDP): within 1e-6 of an uninterrupted 2-process run.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_workers import free_port

WORKER = str(Path(__file__).with_name("resume_worker.py"))


def command(world: int) -> list[str]:
    if world == 1:
        return [sys.executable, WORKER]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), WORKER]


def run(world: int, out: Path, hang_at: int | None = None, parallel: str = "ddp") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PARALLEL": parallel}
    args = [str(out)] + ([str(hang_at)] if hang_at else [])
    return subprocess.Popen(command(world) + args, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_when_hanging(process: subprocess.Popen, out: Path, world: int) -> None:
    """SIGKILL every training process once all have reached the hanging step, and the launcher with them
    (torchrun starts its workers in sessions of their own, so killing its group alone would leave them running)."""
    marks = [Path(f"{out}.hanging.{rank}") for rank in range(world)]
    deadline = time.monotonic() + 120
    while not all(mark.exists() for mark in marks):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the worker never reached its hanging step"
        time.sleep(0.05)
    for mark in marks:
        os.kill(int(mark.read_text()), signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finished(process: subprocess.Popen, out: Path) -> dict:
    output = process.communicate(timeout=180)[0].decode()
    assert process.returncode == 0, output
    return torch.load(f"{out}.final.pt", weights_only=True)


@pytest.mark.parametrize("world, parallel, tolerance", [(1, "none", 0.0), (2, "ddp", 1e-6), (2, "fsdp", 1e-6)])
def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path, world, parallel, tolerance):
    uninterrupted = run(world, tmp_path / "whole", parallel=parallel)
    killed_out = tmp_path / "killed"
    kill_when_hanging(run(world, killed_out, hang_at=14, parallel=parallel), killed_out, world)  # state saved at 12
    assert not Path(f"{killed_out}.final.pt").exists()
    resumed = finished(run(world, killed_out, parallel=parallel), killed_out)
    expected = finished(uninterrupted, tmp_path / "whole")
    assert resumed["steps_run"] == list(range(13, 31))  # it went on from the state of step 12
    assert resumed["losses"] == pytest.approx(expected["losses"], abs=tolerance)
    for key, value in expected["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, atol=tolerance, rtol=0, msg=key)
