"""Models: the seed MLPs, a small CNN, and local Hugging Face models (an encoder, causal language models)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .cnn import vgg_small
from .llm import load_causal_lm
from .mlp import fmnist_mlp, part_three, richboynet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "richboynet": richboynet,
    "part-three": part_three,
    "fmnist-mlp": fmnist_mlp,
    "vgg-small": vgg_small,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """A fresh, randomly initialised model by its registry name (keyword arguments go to its builder)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return builder(**kwargs)


__all__ = ["MODELS", "build_model", "load_causal_lm", "fmnist_mlp", "part_three", "richboynet", "vgg_small"]
