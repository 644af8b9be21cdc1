"""Where and in which dtype lorakit creates adapter tensors: the base weight's device, the ``adapter_dtype`` rule.

``adapter_dtype="float32"`` (the default, as PEFT's ``autocast_adapter_dtype``): a half-precision (bf16/fp16) or
non-float (quantised, float8) base gets float32 factors, so optimisers update them in full precision and
``GradScaler`` accepts their gradients; a float32 or float64 base keeps its own dtype (never a downcast).
``adapter_dtype="base"``: the base weight's dtype when it is an ordinary float type, else float32.

Forward passes cast the adapter branch's input to the adapter dtype and its output back to the base output's dtype.
"""
from __future__ import annotations

import torch

_ORDINARY_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def adapter_dtype(weight: torch.Tensor, choice: str = "float32") -> torch.dtype:
    """The dtype of new adapter tensors for a base ``weight`` under ``choice`` ('float32' or 'base')."""
    if choice not in ("float32", "base"):
        raise ValueError(f"adapter_dtype={choice!r} is not supported; choose 'float32' or 'base'")
    if weight.dtype not in _ORDINARY_FLOATS:
        return torch.float32
    if choice == "base" or weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


def factory_kwargs(weight: torch.Tensor, choice: str = "float32") -> dict:
    """``device=`` and ``dtype=`` for new adapter tensors next to ``weight``."""
    return {"device": weight.device, "dtype": adapter_dtype(weight, choice)}


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight delta ``s B A`` is computed in before it is cast once into W: at least float32."""
    return torch.promote_types(dtype, torch.float32)
