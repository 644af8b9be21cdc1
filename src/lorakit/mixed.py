"""Several adapters in one batch: ``with mixed_batch(model, ["fr", "de", None]): model.generate(...)``.

Row i of every input uses LoRA adapter ``adapter_names[i]``; ``None`` is the base model. Each LoRA layer computes
the low-rank term of all rows at once: it stacks its adapters' factors (the scale folded into B, a zero slot
for the base and for adapters that do not target the layer), gathers each row's pair, and runs two batched
matrix products (``torch.bmm``). That is the single-adapter computation with per-row factors, not a loop over
sub-batches, so a forward or a ``generate()`` step costs about what one adapter costs. The factors are read on
entering the block; leave and enter again after changing them.

Supported: LoRA in module mode on Linear, Hugging Face Conv1D and Embedding layers, in eval mode, unmerged; DoRA
adapters too (each row's ``m / ||W + s B A||`` scales its ``W x`` and is folded into its B).
Refused by name, before anything changes: prompts, bottleneck adapters and C-LoRA; LoRA on convolutions, in
parametrize mode, with a PiSSA start, ``modules_to_save`` or trainable tokens; a model in training mode or with a merged
adapter. Inside the block a batch whose size is not ``len(adapter_names)`` is refused by the first layer it
reaches (for beam search, repeat each name ``num_beams`` times).
"""
from __future__ import annotations

import contextlib

from torch import nn

from .config import LoRAConfig
from .inject import adapter_layers, parametrizations
from .layers.lora import LoRALinear, LoRAWrapper
from .layers.lora_embedding import LoRAEmbedding
from .wrapped import unwrap_model


def _refusal(model: nn.Module, names: list[str | None]) -> str | None:
    """Why ``names`` cannot run as a mixed batch on ``model`` (None when they can)."""
    configs = getattr(model, "lorakit_configs", {})
    unknown = [n for n in names if n is not None and n not in configs]
    if unknown:
        return f"unknown adapter names {unknown}; the model has: {list(configs) or 'none'} (None means the base)"
    for name in dict.fromkeys(n for n in names if n is not None):
        cfg = configs[name]
        if not isinstance(cfg, LoRAConfig):
            return f"adapter {name!r} is a {type(cfg).__name__}; mixed batches take LoRA adapters only"
        if cfg.mode != "module" or cfg.init == "svd" or cfg.modules_to_save or cfg.trainable_token_indices:
            return (f"LoRA adapter {name!r} has mode={cfg.mode!r}, init={cfg.init!r}, modules_to_save="
                    f"{cfg.modules_to_save!r}, trainable_token_indices={cfg.trainable_token_indices!r}; mixed "
                    "batches take mode='module' adapters without a PiSSA start (init='svd'), modules_to_save or "
                    "trainable tokens")
    if model.training:
        return "the model is in training mode; mixed batches are for inference: call model.eval() first"
    if parametrizations(model):
        return "the model has parametrize-mode LoRA adapters, which mixed batches do not support"
    for path, layer in adapter_layers(model):
        if getattr(layer, "merged_adapter", None) is not None:
            return f"layer {path!r} holds merged adapter {layer.merged_adapter!r}: call lorakit.unmerge(model) first"
        if not isinstance(layer, (LoRALinear, LoRAEmbedding)):
            if isinstance(layer, LoRAWrapper) and set(names) & set(layer.adapter_names):
                return f"layer {path!r} is a {type(layer).__name__}; mixed batches support Linear and Embedding"
            if not isinstance(layer, LoRAWrapper) and getattr(layer, "active_adapter", None) is not None:
                return (f"{path or 'the model'} has active {type(layer).__name__} adapter {layer.active_adapter!r}, "
                        "which would apply to every row; set_active a LoRA adapter first")
        elif getattr(layer, "pissa_start", None):
            return f"layer {path!r} holds a PiSSA adapter (init='svd'), which mixed batches do not support"
    return None


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str | None] | tuple[str | None, ...]):
    """Inside, row i of every batch uses LoRA adapter ``adapter_names[i]`` (``None``: the base model).

    Raises:
        ValueError: ``adapter_names`` names an unknown or unsupported adapter, or the model cannot run mixed
            batches (see the module docstring); nothing has changed then. Inside: a batch of another size.
    """
    inner = unwrap_model(model)
    names = list(adapter_names) if isinstance(adapter_names, (list, tuple)) else []
    if not names or not all(n is None or isinstance(n, str) for n in names):
        raise ValueError(f"adapter_names must be a non-empty list of adapter names or None, got {adapter_names!r}")
    reason = _refusal(inner, names)
    if reason is not None:
        raise ValueError(f"mixed_batch: {reason}")
    layers = [layer for _, layer in adapter_layers(inner) if isinstance(layer, (LoRALinear, LoRAEmbedding))]
    for layer in layers:
        layer.set_mixed(names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.set_mixed(None)
