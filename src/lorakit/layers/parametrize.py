"""LoRA as a ``torch.nn.utils.parametrize`` parametrization: the seeds' way, for any >= 2-D weight.

``register_parametrization(module, "weight", LoRAParametrization(...))`` makes ``module.weight`` read
``W + s * (B A).view(W.shape)``; the names become ``<module>.parametrizations.weight.original`` and
``...weight.0.lora_A`` (rank, cols) / ``...lora_B`` (rows, r), where a weight of shape (rows, *rest) is seen
as a (rows, prod(rest)) matrix. Each named adapter is one parametrization in the module's list.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LoRAConfig


class LoRAParametrization(nn.Module):
    """``W -> W + s * (B A).view_as(W)`` while enabled and not merged."""

    def __init__(self, weight: torch.Tensor, cfg: LoRAConfig, adapter_name: str) -> None:
        super().__init__()
        if weight.dim() < 2:
            raise ValueError(f"parametrize-mode LoRA needs a weight with >= 2 dimensions, got shape {tuple(weight.shape)}")
        if cfg.init == "svd":
            raise ValueError("init='svd' is available in mode='module'; use 'kaiming' or 'gaussian' with mode='parametrize'")
        rows, cols = weight.shape[0], weight[0].numel()
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, cols, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(rows, cfg.rank, dtype=weight.dtype))
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = cfg.scale
        self.adapter_name = adapter_name
        self.enabled = True
        self.merged = False

    def delta(self, shape: torch.Size) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(shape) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return weight
        return weight + self.delta(weight.shape)

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]
