"""Counting parameters: the live count, closed-form formulas per method, and the seeds' printed listings."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .config import LoRAConfig
from .inject import adapter_layers, find_targets, is_adapter_layer, parametrizations
from .layers.lora import is_hf_conv1d, lora_wrapper_for


@dataclass(frozen=True)
class ParamCount:
    total: int
    """Every parameter of the model, base and adapters, each counted once."""
    trainable: int
    """Parameters with ``requires_grad``."""
    adapter: int
    """Parameters lorakit added (every adapter's factors and ``modules_to_save`` copies)."""

    @property
    def base(self) -> int:
        return self.total - self.adapter

    @property
    def increment_percent(self) -> float:
        """Added parameters as a percentage of the base model, as seed 000 prints it."""
        return 100.0 * self.adapter / self.base if self.base else 0.0


def count_parameters(model: nn.Module) -> ParamCount:
    params = {id(p): p for p in model.parameters()}
    added = {id(p): p for _, layer in adapter_layers(model) for p in layer.adapter_parameters()}
    added |= {id(p): p for *_, lora in parametrizations(model) for p in lora.adapter_parameters()}
    return ParamCount(
        total=sum(p.numel() for p in params.values()),
        trainable=sum(p.numel() for p in params.values() if p.requires_grad),
        adapter=sum(p.numel() for p in added.values()),
    )


# -- closed-form formulas -------------------------------------------------------------------------
def lora_layer_parameters(module: nn.Module, rank: int) -> int:
    """r (in + out) for Linear/Conv1D, r (in k^d + out) for convs, r (num + dim) for embeddings."""
    if isinstance(module, nn.Embedding):
        return rank * (module.num_embeddings + module.embedding_dim)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return rank * (module.in_channels * math.prod(module.kernel_size) + module.out_channels)
    weight = module.weight
    out_features, in_features = (weight.shape[1], weight.shape[0]) if is_hf_conv1d(module) else weight.shape
    return rank * (in_features + out_features)


def lora_added_parameters(model: nn.Module, cfg: LoRAConfig) -> int:
    """What ``inject(model, cfg)`` will add, computed from the shapes alone (no injection)."""
    if cfg.mode == "parametrize":
        paths = find_targets(model, cfg.targets, cfg.exclude,
                             lambda m: getattr(m, cfg.target_parameter, None) is not None)
        weights = [getattr(model.get_submodule(p), cfg.target_parameter) for p in paths]
        return sum(cfg.rank * (w.shape[0] + w[0].numel()) for w in weights)
    paths = find_targets(model, cfg.targets, cfg.exclude, lambda m: lora_wrapper_for(m) is not None)
    return sum(lora_layer_parameters(model.get_submodule(p), cfg.rank) for p in paths)


# -- listings like the seeds print them -----------------------------------------------------------
def parameter_listing(model: nn.Module, title: str = "Parameters") -> str:
    """A Markdown table of every parameter's name, shape and size, then the total (seed 000's listing)."""
    rows = [f"| `{name}` | {list(p.shape)} | {p.numel():,} |" for name, p in model.named_parameters()]
    total = sum(p.numel() for p in model.parameters())
    return "\n".join([f"#### {title}", "", "| name | shape | parameters |", "|---|---|---:|", *rows,
                      f"| **total** | | **{total:,}** |", ""])


def increment_summary(model: nn.Module) -> str:
    """Seed 000's "increment of parameters" block for an injected model."""
    count = count_parameters(model)
    return "\n".join([
        "#### Increment of parameters",
        "",
        f"- non-adapter parameters: {count.base:,}",
        f"- adapter parameters: {count.adapter:,}",
        f"- increment: {count.increment_percent:.4f} %",
        f"- trainable: {count.trainable:,}",
        "",
    ])


__all__ = ["ParamCount", "count_parameters", "lora_layer_parameters", "lora_added_parameters",
           "parameter_listing", "increment_summary", "is_adapter_layer"]
