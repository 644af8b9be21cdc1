"""Modules trained fully beside an adapter (e.g. a new classifier head), as PEFT's ``modules_to_save``.

The original module stays frozen as ``original_module``; each adapter trains its own copy in
``modules_to_save[name]``, so disabling the adapter, or unloading it without merging, gives the original back.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSave(nn.Module):
    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str, cfg=None) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        return list((self.modules_to_save if name is None else self.modules_to_save[name]).parameters())

    def merge(self) -> None:  # nothing to fold: the copy simply replaces the original
        pass

    def unmerge(self) -> None:
        pass

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict())

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)
