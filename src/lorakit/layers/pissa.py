"""PiSSA starts (``init="svd"``) for ``LoRALinear``: ``s B0 A0`` takes the top-r part of W, W keeps the residual.

The layer keeps ``A0, B0`` as non-persistent buffers (:class:`_PiSSAStart`), so the original base comes back exactly
(``disabled``, ``unload(merge=False)``, ``delete_adapter``) and checkpoints can be converted to a plain adapter on
the original base. A mixin of :class:`~lorakit.layers.lora.LoRALinear`: it uses the layer's ``scaling``,
``pissa_start``, ``_weight()``, ``delta_weight()``, ``_delta()`` and ``_oriented()``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .precision import merge_dtype


class _PiSSAStart(nn.Module):
    """A PiSSA adapter's initial factors, as non-persistent buffers (they follow ``.to()``, not checkpoints)."""

    def __init__(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a0", a0.detach().clone(), persistent=False)  # (r, in)
        self.register_buffer("b0", b0.detach().clone(), persistent=False)  # (out, r)


class PiSSAStarts:
    """The PiSSA part of ``LoRALinear``: make the start, give it back, and add back the starts not in use."""

    def _init_pissa(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """PiSSA: ``s B A`` = the top-r part of W; W keeps the residual, so the output is unchanged."""
        rank, s = a.shape[0], self.scaling[name]
        w = self._weight()
        u, sv, vh = torch.linalg.svd(w.to(merge_dtype(w.dtype)), full_matrices=False)
        root = sv[:rank].sqrt() / math.sqrt(s)
        b.copy_(u[:, :rank] * root)
        a.copy_(root[:, None] * vh[:rank])
        self.pissa_start[name] = _PiSSAStart(a, b)
        self.base_layer.weight.sub_(self.delta_weight(name))

    def pissa_initial(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        start = self.pissa_start[name] if name in self.pissa_start else None
        return None if start is None else (start.a0, start.b0)

    def _restore_pissa_start(self, name: str) -> None:
        if name in self.pissa_start:
            start = self.pissa_start[name]
            with torch.no_grad():
                self.base_layer.weight.add_(self._oriented(self._delta(start.a0, start.b0, self.scaling[name])))
            del self.pissa_start[name]

    def _add_pissa_starts(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """W holds only the residual of every PiSSA adapter: add back ``s B0 A0 x`` of each one not in use."""
        in_use = None if self.disabled else self.active_adapter
        for name, start in self.pissa_start.items():
            if name != in_use:
                low = F.linear(F.linear(x.to(start.a0.dtype), start.a0), start.b0) * self.scaling[name]
                out = out + low.to(out.dtype)
        return out
