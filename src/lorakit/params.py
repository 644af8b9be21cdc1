"""Counting parameters: the live count, closed-form formulas per method, and the seeds' printed listings."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoRAConfig
from .inject import adapter_layers, find_targets, is_adapter_layer, parametrizations
from .layers.base import linear_features, logical_numel
from .layers.lora import is_hf_conv1d
from .layers.wrappers import lora_wrapper_for
from .layers.trainable_tokens import tied_modules, token_modules
from .targets import in_blocks
from .wrapped import unwrap_model


@dataclass(frozen=True)
class ParamCount:
    total: int
    """Every parameter of the model, base and adapters, each counted once."""
    trainable: int
    """Parameters with ``requires_grad``."""
    adapter: int
    """Parameters lorakit added (every adapter's factors, ``modules_to_save`` copies and trainable token rows)."""

    @property
    def base(self) -> int:
        return self.total - self.adapter

    @property
    def increment_percent(self) -> float:
        """Added parameters as a percentage of the base model, as seed 000 prints it."""
        return 100.0 * self.adapter / self.base if self.base else 0.0


def count_parameters(model: nn.Module) -> ParamCount:
    model = unwrap_model(model)  # DDP / torch.compile wrappers count as the model inside
    params = {id(p): p for p in model.parameters()}
    added = {id(p): p for _, layer in adapter_layers(model) for p in layer.adapter_parameters()}
    added |= {id(p): p for *_, lora in parametrizations(model) for p in lora.adapter_parameters()}
    return ParamCount(  # logical numbers: a 4-bit weight counts as its unpacked size, as PEFT counts it
        total=sum(logical_numel(p) for p in params.values()),
        trainable=sum(logical_numel(p) for p in params.values() if p.requires_grad),
        adapter=sum(logical_numel(p) for p in added.values()),
    )


# -- closed-form formulas -------------------------------------------------------------------------
def lora_layer_parameters(module: nn.Module, rank: int) -> int:
    """r (in + out) for Linear/Conv1D, r (in k^d + out) for convs, r (num + dim) for embeddings."""
    if isinstance(module, nn.Embedding):
        return rank * (module.num_embeddings + module.embedding_dim)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return rank * (module.in_channels * math.prod(module.kernel_size) + module.out_channels)
    return rank * sum(linear_features(module, is_hf_conv1d(module)))


def dora_layer_parameters(module: nn.Module) -> int:
    """What DoRA (the magnitude) or ``lora_bias`` (B's bias) adds to a LoRA layer: one per output (an embedding's
    outputs are its ``embedding_dim`` coordinates; lora_bias is refused there)."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.out_channels
    return linear_features(module, is_hf_conv1d(module))[1]


def _is_matrix(value) -> bool:
    """What parametrize mode adapts: a tensor with >= 2 dimensions (not a LayerNorm's vector)."""
    return isinstance(value, torch.Tensor) and value.dim() >= 2


def lora_added_parameters(model: nn.Module, cfg: LoRAConfig) -> int:
    """What ``inject(model, cfg)`` will add, computed from the shapes alone (no injection)."""
    if cfg.mode == "parametrize":
        paths = in_blocks(find_targets(model, cfg.targets, cfg.exclude,
                                       lambda m: _is_matrix(getattr(m, cfg.target_parameter, None))), cfg)
        weights = [(getattr(model.get_submodule(p), cfg.target_parameter), cfg.for_layer(p).rank) for p in paths]
        factors = sum(rank * (w.shape[0] + w[0].numel()) + cfg.dora * w.shape[0] for w, rank in weights)
        return factors + sum(k * dim for k, dim in _token_rows(model, cfg))  # (no lora_bias in this mode)
    total = sum(k * dim for k, dim in _token_rows(model, cfg))
    for path in _lora_paths(model, cfg):
        module = model.get_submodule(path)
        per_output = dora_layer_parameters(module)
        total += lora_layer_parameters(module, cfg.for_layer(path).rank) + per_output * (cfg.dora + cfg.lora_bias)
    return total


def _token_rows(model: nn.Module, cfg: LoRAConfig) -> list[tuple[int, int]]:
    """(rows, width) per module whose rows train (``trainable_token_indices``); a tied head shares its embedding's."""
    plan = token_modules(model, cfg.trainable_token_indices)
    ties = tied_modules(model, plan)
    return [(len(rows), model.get_submodule(p).weight.shape[1]) for p, rows in plan.items() if p not in ties]


def _lora_paths(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The modules a module-mode LoRA config wraps (targets, exclude, layers_to_transform)."""
    return in_blocks(find_targets(model, cfg.targets, cfg.exclude, lambda m: lora_wrapper_for(m) is not None), cfg)


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


# -- closed forms for every method, and the printed derivation (issue 5) -----------------------------------
def full_parameters(model: nn.Module) -> int:
    """Every parameter of the model, tied ones (e.g. T5's shared embedding and LM head) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _adapter_widths(model: nn.Module, cfg) -> list[int]:
    """The output width d of every module an ``AdapterConfig`` targets (checked as ``inject`` checks it)."""
    from .layers.adapter import adapter_wrapper_for, check_adapter_targets, output_width

    paths = find_targets(model, cfg.targets, cfg.exclude, lambda m: adapter_wrapper_for(m) is not None)
    check_adapter_targets(model, paths)
    return [output_width(getattr(model.get_submodule(p), "base_layer", model.get_submodule(p))) for p in paths]


def adapter_added_parameters(model: nn.Module, cfg) -> int:
    """Per target of width d and bottleneck b: down d*b + b, up b*d + d, i.e. ``2 d b + b + d``."""
    return sum(2 * d * cfg.bottleneck + cfg.bottleneck + d for d in _adapter_widths(model, cfg))


def _embedding_dim(model: nn.Module) -> int:
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"a soft prompt needs a model with an input embedding (get_input_embeddings()); "
                         f"{type(model).__name__} has none")
    return embedding.embedding_dim


def prompt_added_parameters(model: nn.Module, cfg) -> int:
    """``num_tokens x d``, d the input embedding width."""
    return cfg.num_tokens * _embedding_dim(model)


def added_parameters(model: nn.Module, cfg) -> int:
    """What ``inject(model, cfg)`` adds, from shapes alone; ``cfg=None`` is full fine-tuning (adds nothing)."""
    from .config import AdapterConfig, PromptConfig

    if cfg is None:
        return 0
    if isinstance(cfg, LoRAConfig):
        return lora_added_parameters(model, cfg)
    if isinstance(cfg, AdapterConfig):
        return adapter_added_parameters(model, cfg)
    if isinstance(cfg, PromptConfig):
        return prompt_added_parameters(model, cfg)
    raise ValueError(f"no closed form for {type(cfg).__name__}; known: LoRAConfig, AdapterConfig, PromptConfig, None (full)")


def _grouped(terms: list[str]) -> str:
    """``["a", "a", "b"]`` -> ``"2 x a + 1 x b"``, first-seen order."""
    counts: dict[str, int] = {}
    for term in terms:
        counts[term] = counts.get(term, 0) + 1
    return " + ".join(f"{n} x {term}" for term, n in counts.items())


def formula(model: nn.Module, cfg) -> str:
    """The closed form of the added parameters as a sum over target shapes, e.g. ``36 x 8 x (512 + 512)``."""
    from .config import AdapterConfig, PromptConfig

    if cfg is None:
        return "sum of numel over every distinct parameter"
    if isinstance(cfg, PromptConfig):
        return f"{cfg.num_tokens} x {_embedding_dim(model)}"
    if isinstance(cfg, AdapterConfig):
        b = cfg.bottleneck
        return _grouped([f"({d}*{b} + {b} + {b}*{d} + {d})" for d in _adapter_widths(model, cfg)])
    if isinstance(cfg, LoRAConfig) and cfg.mode == "module":
        terms = []
        for path in _lora_paths(model, cfg):
            module, rank = getattr(model.get_submodule(path), "base_layer", model.get_submodule(path)), cfg.for_layer(path).rank
            per_rank = lora_layer_parameters(module, 1)
            if isinstance(module, nn.Embedding):
                terms.append(f"{rank} x ({module.num_embeddings} + {module.embedding_dim})"
                             + (f" + {module.embedding_dim}" if cfg.dora else ""))
                continue
            out_f = dora_layer_parameters(module)
            terms.append(f"{rank} x ({per_rank - out_f} + {out_f})" + (f" + {out_f}" if cfg.dora else ""))
        return _grouped(terms + [f"{k} x {dim}" for k, dim in _token_rows(model, cfg)])
    return f"{added_parameters(model, cfg):,}"


def describe(model: nn.Module, cfg) -> str:
    """A few lines: the method, the base model's size, the closed form and its value, the increment."""
    base = full_parameters(model)
    method = "full fine-tuning" if cfg is None else type(cfg).__name__
    lines = [f"model: {type(model).__name__}, {base:,} parameters", f"method: {method}"]
    if cfg is None:
        lines.append(f"trainable: every parameter = {base:,}")
    else:
        added = added_parameters(model, cfg)
        lines += [f"added: {formula(model, cfg)} = {added:,}",
                  f"increment: {100.0 * added / base:.4f} % of the base model" if base else "increment: -"]
    return "\n".join(lines)


__all__ += ["full_parameters", "adapter_added_parameters", "prompt_added_parameters", "added_parameters",
            "formula", "describe"]
