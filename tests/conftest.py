"""Tiny seeded models shared by the LoRA tests, one per supported layer type.

Every factory seeds itself, so two calls give bit-identical base models (the "fresh copy of the base" of
the round-trip tests). Each model has ``example_input()`` and a second layer after the one under test.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@pytest.fixture
def single_thread():
    """Tiny tensors: threads only add overhead (and contention on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def killed_at_decay_step(monkeypatch):
    """``with killed_at_decay_step(n): run()``: the run stops (KeyboardInterrupt) as soon as C-LoRA's decay schedule
    reaches step ``n``, as a process killed between two saved training states; the block expects that stop."""
    import lorakit as lk

    step = lk.DecaySchedule.step

    def killed(n: int):
        def step_then_stop(schedule):
            d = step(schedule)
            if schedule.last_step == n:
                raise KeyboardInterrupt("killed")
            return d

        monkeypatch.setattr(lk.DecaySchedule, "step", step_then_stop)
        try:
            with pytest.raises(KeyboardInterrupt, match="killed"):
                yield
        finally:
            monkeypatch.setattr(lk.DecaySchedule, "step", step)

    return contextlib.contextmanager(killed)


class LinearNet(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 5, d_out: int = 3) -> None:
        super().__init__()
        self.layer = nn.Linear(d_in, hidden)
        self.act = nn.Tanh()
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(self.act(self.layer(x)))

    def example_input(self):
        return torch.randn(4, self.layer.in_features, generator=torch.Generator().manual_seed(1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv1d(3, 4, kernel_size=3, padding=1)
        self.act = nn.Tanh()
        self.head = nn.Conv1d(4, 2, kernel_size=2, stride=2)

    def forward(self, x):
        return self.head(self.act(self.layer(x)))

    def example_input(self):
        return torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))


class Conv2dNet(nn.Module):
    def __init__(self, **layer_options) -> None:
        super().__init__()
        self.layer = nn.Conv2d(3, 4, kernel_size=3, **{"padding": 1, **layer_options})
        self.act = nn.Tanh()
        self.head = nn.Conv2d(4, 2, kernel_size=(2, 1), stride=(2, 1))

    def forward(self, x):
        return self.head(self.act(self.layer(x)))

    def example_input(self):
        return torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.layer(x))

    def example_input(self):
        return torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))


class TokenNet(nn.Module):
    """A plain torch model with PEFT's default embedding name (for trainable token rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens, self.proj, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.embed_tokens(x))))

    def example_input(self):
        return torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))


class Conv1DNet(nn.Module):
    """Hugging Face's GPT-2 style Conv1D (weight stored (in, out)) followed by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs
        self.act = nn.Tanh()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.act(self.layer(x)))

    def example_input(self):
        return torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))


def seeded(cls, *args, **kwargs):
    """A factory returning a fresh, identically initialised ``cls(*args)`` in eval mode."""
    def factory():
        torch.manual_seed(0)
        return cls(*args, **kwargs).eval()
    factory.__name__ = cls.__name__
    return factory


FACTORIES = {
    "linear": seeded(LinearNet),
    "conv1d": seeded(Conv1dNet),
    "conv2d": seeded(Conv2dNet),
    "conv2d_circular": seeded(Conv2dNet, padding=2, dilation=2, stride=(1, 2), padding_mode="circular"),
    "embedding": seeded(EmbeddingNet),
    "hf_conv1d": seeded(Conv1DNet),
}


def perturb_adapters(model: nn.Module, seed: int = 123, std: float = 0.5) -> None:
    """Give every trainable LoRA factor (and modules_to_save copy) random values, B included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def state_snapshot(model: nn.Module) -> dict:
    """Everything an error must leave unchanged: tensors, module types, requires_grad, lorakit attributes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "attrs": {a: getattr(model, a) for a in ("lorakit_configs", "lorakit_active") if a in model.__dict__},
    }


def assert_same_state(model: nn.Module, snapshot: dict) -> None:
    now = state_snapshot(model)
    assert now["types"] == snapshot["types"]
    assert now["grad"] == snapshot["grad"]
    assert now["attrs"] == snapshot["attrs"]
    assert list(now["state"]) == list(snapshot["state"])
    for key, value in snapshot["state"].items():
        assert torch.equal(now["state"][key], value), key


def lorakit_leftovers(model: nn.Module) -> list[str]:
    """Names of modules whose class comes from lorakit or a parametrization, plus lorakit attributes."""
    found = [f"{n}: {type(m).__name__}" for n, m in model.named_modules()
             if type(m).__module__.startswith("lorakit") or type(m).__name__.startswith("Parametrized")]
    found += [a for a in ("lorakit_configs", "lorakit_active") if a in model.__dict__]
    return found
