"""``lorakit.hf.SFTTrainer``: TRL's ``SFTTrainer`` with lorakit's adapter checkpoints (see :mod:`lorakit.hf`).

A module of its own so that only this one imports TRL; ``lorakit.hf`` imports it on first use.
"""
from __future__ import annotations

import trl

from .hf import AdapterCheckpoints


class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """``trl.SFTTrainer`` whose checkpoints are PEFT-layout adapter folders for a lorakit model."""

    __module__ = "lorakit.hf"  # its public home (pickle finds it there)
