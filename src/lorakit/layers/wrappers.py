"""Which LoRA wrapper a module takes."""
from __future__ import annotations

from torch import nn

from .lora import LoRALinear, LoRAWrapper, is_hf_conv1d
from .lora_conv import LoRAConv
from .lora_embedding import LoRAEmbedding


def lora_wrapper_for(module: nn.Module) -> type[LoRAWrapper] | None:
    """The wrapper class for a module, or None when LoRA does not support its type."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return LoRALinear
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoRAConv
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    return None
