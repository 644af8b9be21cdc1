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


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_bert_with_modules_to_save_saves_the_single_process_adapter_from_rank_0_alone(parallel, tmp_path):
    """save_adapter on every rank of a wrapped BERT: rank 0's files equal one process's, key for key and shape for
    shape, the other rank writes nothing, and loading them into a fresh model gives one process's logits."""
    pytest.importorskip("transformers")
    import json

    from safetensors.torch import load_file
    from torch.utils.data import default_collate

    import lorakit as lk
    from distributed_workers import bert_config, lora_bert, text_problem, train_bert_and_save

    model = lora_bert()
    history = train(model, text_problem(), bert_config(log_every=1))
    lk.save_adapter(model, tmp_path / "one")
    spawn(train_bert_and_save, 2, parallel, str(tmp_path))
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert got["frozen_unchanged"]
    assert got["losses"] == pytest.approx(history.losses, abs=1e-5)
    assert not (tmp_path / "rank1").exists()
    one, two = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "rank0"))
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}
    assert len(one) == 10  # 8 LoRA factors, the classifier's weight and bias
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=0, msg=key)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("one", "rank0")]
    assert configs[1] == configs[0]
    fresh = lk.load_adapter(lora_bert(), tmp_path / "rank0")
    batch = default_collate(list(text_problem()))
    batch.pop("labels")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_fsdp2_keep_best_leaves_the_sharded_model_computing_with_the_best_weights(tmp_path):
    """The last validation leaves the root unit's gathered weights in place; restoring the best weights into the
    shards must not leave the next forward on that stale copy (it did, by the last step's weights)."""
    from distributed_workers import keep_best_under_fsdp

    out = tmp_path / "rank0.pt"
    spawn(keep_best_under_fsdp, 2, str(out))
    got = torch.load(out, weights_only=True)
    assert got["best_step"] < got["steps"]  # the best weights are not the last ones
    assert got["difference"] <= 1e-6


def test_fsdp2_merge_unmerge_and_load_after_a_forward_reach_the_next_forward(tmp_path):
    """With the root as the only FSDP2 unit, a forward leaves its gathered weights registered: a write must reshard
    first, or it lands in that gathered copy and is lost at the next reshard (after a backward)."""
    from distributed_workers import merge_and_load_after_a_forward

    out = tmp_path / "differences.pt"
    spawn(merge_and_load_after_a_forward, 2, str(out))
    differences = torch.load(out, weights_only=True)
    assert list(differences) == ["merge", "disabled", "merged again", "unmerged, disabled", "load"]
    for what, difference in differences.items():
        assert difference <= 1e-5, what
