"""train() across 2 processes (gloo, CPU) equals one process on the full batch: DDP and FSDP2."""
import pytest
import torch

from distributed_workers import lora_mlp, mlp_config, problem, spawn, train_mlp
from lorakit.train import train


@pytest.fixture(scope="module")
def single_process():
    model = lora_mlp()
    history = train(model, problem(), mlp_config(log_every=1))
    return history, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(parallel, single_process, tmp_path):
    history, expected = single_process
    out = tmp_path / "rank0.pt"
    spawn(train_mlp, 2, parallel, str(out))
    got = torch.load(out, weights_only=True)
    assert got["frozen_unchanged"]
    assert got["seen"] == (90 + 4 * 12) // 2  # 12 steps of 12 over 90 examples: rank 0 saw half of them
    assert got["losses"] == pytest.approx(history.losses, abs=1e-5)
    for key, value in expected.items():
        torch.testing.assert_close(got["state"][key], value, atol=1e-5, rtol=0, msg=key)


def test_nan_on_one_rank_stops_every_rank_at_that_step_and_only_rank_0_writes(tmp_path):
    from distributed_workers import nan_on_rank_one

    out = tmp_path / "run"
    spawn(nan_on_rank_one, 2, str(out))
    errors = [torch.load(f"{out}.rank{r}.error.pt", weights_only=True) for r in range(2)]
    assert [e["step"] for e in errors] == [3, 3]
    assert all("diverged at step 3" in e["message"] for e in errors)
    assert (tmp_path / "run.rank0.safetensors").exists() and (tmp_path / "run.rank0.state.pt").exists()
    assert not (tmp_path / "run.rank1.safetensors").exists() and not (tmp_path / "run.rank1.state.pt").exists()


def test_a_layer_that_never_runs_under_ddp_names_find_unused_parameters(tmp_path):
    from distributed_workers import unused_adapter

    out = tmp_path / "run"
    spawn(unused_adapter, 2, str(out))
    message = torch.load(f"{out}.rank0.error.pt", weights_only=True)["message"]
    assert "find_unused_parameters" in message
