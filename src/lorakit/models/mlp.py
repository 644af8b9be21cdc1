"""The seed MLPs, built so their parameter names match the seeds exactly.

Every model is an ``nn.Sequential`` of named children that starts with ``nn.Flatten``, so it takes
images of shape (B, 1, 28, 28) or flat inputs (B, 784) and returns logits (B, 10). Activations are
modules of their own: a Linear can be swapped for a low-rank layer and keep its activation.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

IMAGE_PIXELS = 28 * 28


def _named(**children: nn.Module) -> nn.Sequential:
    """An ``nn.Sequential`` whose children carry the given names (in keyword order)."""
    return nn.Sequential(OrderedDict(children))


def richboynet(hidden1: int = 1000, hidden2: int = 2000, num_classes: int = 10) -> nn.Sequential:
    """The PyTorch LoRA tutorial's "RichBoyNet" (seed 001): 2,807,010 parameters.

    784 -> ``linear1`` (1000) -> ReLU -> ``linear2`` (2000) -> ReLU -> ``linear3`` (10), no activation
    on the logits.
    """
    return _named(
        flatten=nn.Flatten(),
        linear1=nn.Linear(IMAGE_PIXELS, hidden1),
        relu1=nn.ReLU(),
        linear2=nn.Linear(hidden1, hidden2),
        relu2=nn.ReLU(),
        linear3=nn.Linear(hidden2, num_classes),
    )


def _part_three_block(width: int, hidden1: int, hidden2: int) -> nn.Sequential:
    """One block of seed 000: width -> 1000 (ReLU) -> 2000 (ReLU) -> width, no activation at the end."""
    return _named(
        linear1=nn.Linear(width, hidden1),
        relu1=nn.ReLU(),
        linear2=nn.Linear(hidden1, hidden2),
        relu2=nn.ReLU(),
        linear3=nn.Linear(hidden2, width),
    )


def part_three(num_blocks: int = 2, num_classes: int = 10) -> nn.Sequential:
    """Seed 000's "Part Three" model: 8,719,418 parameters.

    Parameter names: ``sequential_layers.layers.{0,1}.linear{1,2,3}.{weight,bias}`` and
    ``mlp_head.{weight,bias}``.
    """
    blocks = nn.Sequential(*(_part_three_block(IMAGE_PIXELS, 1000, 2000) for _ in range(num_blocks)))
    return _named(
        flatten=nn.Flatten(),
        sequential_layers=_named(layers=blocks),
        mlp_head=nn.Linear(IMAGE_PIXELS, num_classes),
    )


def fmnist_mlp(hidden1: int = 256, hidden2: int = 128, num_classes: int = 10) -> nn.Sequential:
    """Seed 002's Fashion-MNIST toy: 784 -> ``fc1`` (256) ReLU -> ``fc2`` (128) ReLU -> ``fc3`` (10).

    235,146 parameters. C-LoRA compresses ``fc1`` and ``fc2``; ``relu1``/``relu2`` stay in place.
    """
    return _named(
        flatten=nn.Flatten(),
        fc1=nn.Linear(IMAGE_PIXELS, hidden1),
        relu1=nn.ReLU(),
        fc2=nn.Linear(hidden1, hidden2),
        relu2=nn.ReLU(),
        fc3=nn.Linear(hidden2, num_classes),
    )
