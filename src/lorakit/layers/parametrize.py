"""LoRA as a ``torch.nn.utils.parametrize`` parametrization: the seeds' way, for any >= 2-D weight.

``register_parametrization(module, "weight", LoRAParametrization(...))`` makes ``module.weight`` read
``W + s * (B A).view(W.shape)``; the names become ``<module>.parametrizations.weight.original`` and
``...weight.0.lora_A`` (rank, cols) / ``...lora_B`` (rows, r), where a weight of shape (rows, *rest) is seen
as a (rows, prod(rest)) matrix. Each named adapter is one parametrization in the module's list.

The factors live on the weight's device, in the ``adapter_dtype`` rule's dtype (float32 on a bf16/fp16 weight by
default); the delta is cast to the weight's dtype when added. LoRA dropout acts on the layer's input ``x``, which a
parametrization never sees (it only maps W to a new W), so ``dropout > 0`` is refused here, not silently ignored.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import LoRAConfig
from .dora import base_squares, merged_delta, unmerged_delta
from .precision import factory_kwargs, merge_dtype


class LoRAParametrization(nn.Module):
    """``W -> W + s * (B A).view_as(W)`` while enabled and not merged; with DoRA each row of that is scaled by
    ``m / ||row||`` (the norm detached), m one trained entry per row (``lora_magnitude_vector``)."""

    def __init__(self, weight: torch.Tensor, cfg: LoRAConfig, adapter_name: str) -> None:
        super().__init__()
        if weight.dim() < 2:
            raise ValueError(f"parametrize-mode LoRA needs a weight with >= 2 dimensions, got shape {tuple(weight.shape)}")
        if cfg.init == "svd":
            raise ValueError("init='svd' is available in mode='module'; use 'kaiming' or 'gaussian' with mode='parametrize'")
        if cfg.dropout > 0:
            raise ValueError(f"dropout={cfg.dropout} is not available with mode='parametrize': LoRA dropout acts on the "
                             "layer's input, which a parametrization of the weight never sees; use mode='module' for "
                             "dropout, or dropout=0.0 with mode='parametrize'")
        rows, cols = weight.shape[0], weight[0].numel()
        like = factory_kwargs(weight, cfg.adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, cols, **like))
        self.lora_B = nn.Parameter(torch.zeros(rows, cfg.rank, **like))
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = cfg.scale
        self.adapter_name = adapter_name
        self.enabled = True
        self.merged = False
        self.lora_magnitude_vector = None
        self._merged_scale: torch.Tensor | None = None
        if cfg.dora:  # m = ||W|| (B = 0): the outputs start unchanged
            self.lora_magnitude_vector = nn.Parameter(base_squares(weight.detach().flatten(1)).sqrt().to(like["dtype"]))

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """``s B A`` viewed as ``shape``, in float32 (or wider), for merging: one in-place add rounds it into W."""
        dtype = merge_dtype(self.lora_A.dtype)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).view(shape) * self.scale

    def gain(self, adapted: torch.Tensor) -> torch.Tensor:
        """DoRA's ``m / ||row||`` for the adapted weight ``W + s B A``, shaped to scale its rows."""
        g = self.lora_magnitude_vector / base_squares(adapted.detach().flatten(1)).sqrt().to(self.lora_magnitude_vector.dtype)
        return g.view(-1, *[1] * (adapted.dim() - 1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return weight
        low = (self.lora_B @ self.lora_A).view(weight.shape) * self.scale  # adapter dtype (autocast: its dtype)
        adapted = weight + low.to(weight.dtype)
        if self.lora_magnitude_vector is None:
            return adapted
        return (adapted * self.gain(adapted)).to(weight.dtype)

    def merge_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """What a merge adds to the original weight: ``s B A``, or DoRA's ``g (W + s B A) - W``."""
        delta = self.delta(weight.shape)
        if self.lora_magnitude_vector is None:
            return delta
        w = weight.detach().to(delta.dtype)
        self._merged_scale = self.gain(w + delta).detach().to(delta.dtype)
        return merged_delta(w, delta, self._merged_scale)

    def unmerge_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """What an unmerge adds to the merged weight: ``-s B A``, or DoRA's ``W' / g - s B A - W'``."""
        delta = self.delta(weight.shape)
        if self.lora_magnitude_vector is None:
            return -delta
        g, self._merged_scale = self._merged_scale, None
        return unmerged_delta(weight.detach().to(delta.dtype), delta, g)

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        extra = [] if self.lora_magnitude_vector is None else [self.lora_magnitude_vector]
        return [self.lora_A, self.lora_B, *extra]


class ParametrizedWeight:
    """One :class:`LoRAParametrization` of ``module.<pname>`` seen through the adapter-layer protocol.

    ``adapter_names``, ``active_adapter``, ``merged_adapter``, ``set_active``, ``merge``, ``unmerge``, ``disabled``,
    ``delete_adapter``, ``adapter_parameters`` and ``detach_from`` mean what they mean for a wrapper layer, so that
    ``lorakit.inject`` writes each operation once over both forms. It is a view, built afresh by each walk of the model:
    the state lives in the parametrization (``enabled``, ``merged``) and in ``module.parametrizations[pname]``.
    """

    def __init__(self, module: nn.Module, pname: str, lora: LoRAParametrization) -> None:
        self.module, self.pname, self.lora = module, pname, lora
        self._deleted = False
        self._enabled_before: bool | None = None

    @property
    def _plist(self) -> nn.Module:
        return self.module.parametrizations[self.pname]

    @property
    def adapter_names(self) -> list[str]:
        return [] if self._deleted else [self.lora.adapter_name]

    @property
    def active_adapter(self) -> str | None:
        return self.lora.adapter_name if self.lora.enabled else None

    @property
    def merged_adapter(self) -> str | None:
        return self.lora.adapter_name if self.lora.merged else None

    def set_active(self, name: str | None) -> None:
        if name != self.lora.adapter_name:  # as the wrappers do: a merged adapter switched off is taken out
            self.unmerge()
        self.lora.enabled = name == self.lora.adapter_name

    @property
    def disabled(self) -> bool:
        return self._enabled_before is not None

    @disabled.setter
    def disabled(self, value: bool) -> None:
        if value and self._enabled_before is None:
            self._enabled_before, self.lora.enabled = self.lora.enabled, False
        elif not value and self._enabled_before is not None:
            self.lora.enabled, self._enabled_before = self._enabled_before, None

    def merge_weight(self) -> tuple[torch.Tensor, nn.Module]:
        """The tensor a merge writes into (the parametrized original) and the module that owns it."""
        return self._plist.original, self._plist

    def merge(self) -> None:
        if not self.lora.merged:
            with torch.no_grad():
                original = self._plist.original
                original += self.lora.merge_delta(original)
            self.lora.merged = True

    def unmerge(self) -> None:
        if self.lora.merged:
            with torch.no_grad():
                original = self._plist.original
                original += self.lora.unmerge_delta(original)
            self.lora.merged = False

    def delete_adapter(self, name: str) -> None:
        """Take the adapter out of the weight; :meth:`detach_from` then removes the parametrization."""
        self.unmerge()
        self._deleted = True

    def detach_from(self, model: nn.Module, path: str) -> None:
        """Remove this parametrization from its weight (the last one gives the module its plain parameter back)."""
        plist = self._plist
        if len(plist) == 1:
            parametrize.remove_parametrizations(self.module, self.pname, leave_parametrized=False)
        else:
            del plist[[i for i, p in enumerate(plist) if p is self.lora][0]]

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        return self.lora.adapter_parameters()
