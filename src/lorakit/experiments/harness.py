"""What the experiments share when they train: the hooks that make a C-LoRA run resumable."""
from __future__ import annotations

from torch import nn

import lorakit as lk


def clora_decay_hooks(model: nn.Module, total_steps: int) -> dict:
    """``train``'s ``on_step`` and ``stateful`` for a C-LoRA model: its :class:`lorakit.DecaySchedule` over
    ``total_steps``, advanced after every optimizer step and saved in the training state, so that a run resumed
    mid-way continues its decay where it stopped instead of starting again from d = 1.

    ``model`` is the one that trains (under FSDP2 a sharded twin): the schedule drives its C-LoRA layers."""
    schedule = lk.DecaySchedule(model, total_steps)
    return {"on_step": lambda step: schedule.step(), "stateful": {"decay": schedule}}
