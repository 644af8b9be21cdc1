"""The explicit batch order (== DataLoader's) and resuming a stopped run to the same weights, bit for bit."""
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lorakit.batches import BatchOrder
from lorakit.train import TrainConfig, train


@pytest.mark.parametrize("n, batch, shuffle", [(23, 5, True), (20, 5, True), (7, 10, True), (23, 5, False)])
def test_batch_order_equals_a_seeded_dataloader_over_epochs(n, batch, shuffle):
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(3))
    expected = [b[0].tolist() for _ in range(3) for b in loader]
    order = BatchOrder(n, batch, seed=3, shuffle=shuffle)
    assert [order.next_batch().indices for _ in expected] == expected


@pytest.mark.parametrize("stop", [1, 5, 6, 8, 12])  # 6 batches per epoch: inside epochs and at their ends
def test_batch_order_resumes_where_it_stopped(stop):
    whole = BatchOrder(23, 4, seed=1)
    expected = [whole.next_batch().indices for _ in range(15)]
    first = BatchOrder(23, 4, seed=1)
    taken = [first.next_batch().indices for _ in range(stop)]
    second = BatchOrder(23, 4, seed=1)
    second.load_state_dict(first.state_dict())
    assert taken + [second.next_batch().indices for _ in range(15 - stop)] == expected


@pytest.mark.parametrize("n, batch, world", [(24, 6, 2), (23, 6, 2), (13, 6, 3), (25, 6, 3)])
def test_rank_slices_cover_each_global_batch_with_weights_that_average_to_the_global_mean(n, batch, world):
    single = BatchOrder(n, batch, seed=0)
    ranks = [BatchOrder(n, batch, seed=0, rank=r, world_size=world) for r in range(world)]
    for _ in range(2 * single.batches_per_epoch):
        whole = single.next_batch().indices
        parts = [order.next_batch() for order in ranks]
        assert sum((p.indices for p in parts if p.weight > 0), []) == whole
        values = torch.randn(n, generator=torch.Generator().manual_seed(len(whole)))
        averaged = sum(p.weight * values[p.indices].mean() for p in parts) / world  # what DDP's mean gives
        torch.testing.assert_close(averaged, values[whole].mean())


def test_a_world_size_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(ValueError, match="not divisible by the world size 4; .* a number of processes that divides 30"):
        BatchOrder(100, 30, seed=0, world_size=4)


class Counter:
    """A stand-in for a DecaySchedule: state that on_step changes and the training state must carry."""

    def __init__(self):
        self.count = 0

    def step(self, _):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def model_and_config(tmp_path, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    model.register_buffer("seen", torch.zeros(()))
    cfg = TrainConfig(lr=0.05, batch_size=8, steps=23, optimizer="adamw", schedule="cosine", warmup_steps=3,
                      eval_every=4, checkpoint_every=5, state_path=str(tmp_path / "state.pt"), progress=False)
    return model, dataclasses.replace(cfg, **overrides)


def run(model, cfg, counter, stop_at=None):
    def on_step(step):
        model.seen += 1
        counter.step(step)
        if step == stop_at:
            raise KeyboardInterrupt  # a kill between two state saves

    return train(model, problem(), cfg, on_step=on_step, validation=problem(), num_classes=3,
                 stateful={"counter": counter})


def test_a_stopped_run_resumed_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    model, cfg = model_and_config(tmp_path / "a")
    reference = run(model, cfg, Counter())
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    stopped, cfg_b = model_and_config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run(stopped, cfg_b, Counter(), stop_at=13)  # the last state was saved at step 10
    resumed, cfg_b = model_and_config(tmp_path / "b", resume=True)  # a fresh process: a fresh model
    counter = Counter()
    history = run(resumed, cfg_b, counter)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert counter.count == 23
    assert history.losses == reference.losses and history.val_accuracies == reference.val_accuracies
    assert history.best_step == reference.best_step


def test_resume_of_a_finished_run_trains_nothing_more(tmp_path):
    model, cfg = model_and_config(tmp_path)
    run(model, cfg, Counter())
    again, cfg = model_and_config(tmp_path, resume=True)
    counter = Counter()
    run(again, cfg, counter)
    assert counter.count == 23  # restored, not advanced
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("change, named", [({"lr": 0.01}, "lr=0.05"), ({"seed": 1}, "seed=0")])
def test_resume_with_other_settings_is_refused_naming_them(tmp_path, change, named):
    model, cfg = model_and_config(tmp_path)
    run(model, cfg, Counter())
    other, cfg = model_and_config(tmp_path, resume=True, **change)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=named):
        run(other, cfg, Counter())
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_resume_into_another_model_is_refused_naming_the_tensor(tmp_path):
    model, cfg = model_and_config(tmp_path)
    run(model, cfg, Counter())
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    other.register_buffer("seen", torch.zeros(()))
    with pytest.raises(ValueError, match="differs at '0.weight'"):
        run(other, dataclasses.replace(cfg, resume=True), Counter())
