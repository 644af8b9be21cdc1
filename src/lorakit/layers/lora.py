"""LoRA wrapper layers: ``x -> W0 x + s * B (A x)`` with ``s = alpha / r`` (or alpha / sqrt(r), rsLoRA).

The forward is written in low-rank form: ``B A`` is built only to merge. Each wrapper keeps the original
module as ``base_layer`` and its named adapters in ``nn.ModuleDict``s, so state-dict keys read like PEFT's
(``q.lora_A.default.weight``). One adapter is active at a time.

Every forward calls ``base_layer(x)`` (subclasses, hooks, quantised and sharded layers stay correct) and adds
the low-rank term, computed in the adapter dtype (float32 on a bf16/fp16 base by default, see ``precision.py``)
and cast to the base output's dtype. ``LoRALinear`` takes a fused autograd path only where
:func:`~lorakit.layers._fused.fused_path_applies` proves it computes the same thing.

This file holds the wrapper every kind shares and ``LoRALinear``; ``LoRAConv`` and ``LoRAEmbedding`` have a file
each (``lora_conv.py``, ``lora_embedding.py``), and ``wrappers.py`` says which one a module takes. PiSSA starts
(``init="svd"``, ``pissa.py``), DoRA (``dora.py``) and mixed batches (``lora_mixed.py``) are mixins of these
classes, one file each.

Quantised bases (bitsandbytes 4-bit/8-bit, QLoRA): the factors take the layer's logical shape, never the packed
weight's, and merging dequantises, adds and requantises (``layers/base.py`` knows each kind of base layer).

Shapes: Linear/Conv1D A (r, in), B (out, r); ConvNd A (r, in, *k), B (out, r, 1, ...);
Embedding A (r, num_embeddings), B (embedding_dim, r) as PEFT's ``lora_embedding_A/B``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoRAConfig
from ._fused import FusedLoRALinear, fused_linear, fused_path_applies
from .base import add_to_weight, check_mergeable, dense_weight, linear_features, quantisation
from .dora import DoRALayer
from .lora_mixed import MixedRows
from .pissa import PiSSAStarts
from .precision import factory_kwargs, merge_dtype

_FusedLoRALinear = FusedLoRALinear  # the name the tests and benchmarks know


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 style ``Conv1D`` (a Linear with weight stored (in, out)); no import of transformers."""
    is_conv1d = any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)  # also when parametrized
    return is_conv1d and hasattr(module, "nf") and module.weight.dim() == 2


class LoRAWrapper(DoRALayer, MixedRows, nn.Module):
    """What every LoRA wrapper shares: named adapters, the active one, merge/unmerge, PEFT tensors."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.disabled = False
        self._init_dora()
        self.train(base_layer.training)  # a model put in eval() before inject stays in eval

    # -- adapters ---------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def add_adapter(self, name: str, cfg: LoRAConfig) -> None:
        self._add_factors(name, cfg.rank, factory_kwargs(self.base_layer.weight, cfg.adapter_dtype))
        self.scaling[name] = cfg.scale
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._init_factors(name, cfg.init)
        if cfg.lora_bias:  # PEFT's lora_bias: B gets a bias, zero at the start, scaled with B A
            like = factory_kwargs(self.base_layer.weight, cfg.adapter_dtype)
            self.lora_B[name].bias = nn.Parameter(torch.zeros(self.lora_B[name].weight.shape[0], **like))
        if cfg.dora:
            self._add_magnitude(name)
        self.active_adapter = name
        self.train(self.training)  # the new factors and dropout follow the wrapper's train/eval mode

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        self._restore_pissa_start(name)
        for store in self._factor_stores():
            del store[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self._norms.drop(name)
        del self.lora_dropout[name]
        del self.scaling[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        if self.merged_adapter is not None and self.merged_adapter != name:
            self.unmerge()
        self.active_adapter = name

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Parameters of adapter ``name``, or of every adapter."""
        names = self.adapter_names if name is None else [name]
        params = []
        for store in self._factor_stores():
            for item in (store[n] for n in names):
                params += list(item.parameters()) if isinstance(item, nn.Module) else [item]
        return params + [self.lora_magnitude_vector[n] for n in names if n in self.lora_magnitude_vector]

    # -- merging ----------------------------------------------------------------------------------
    def merge(self) -> None:
        """Add the active adapter's ``s B A`` into the base weight (idempotent).

        The delta is computed in float32 (or wider) and W is updated by one in-place add, which rounds once to
        W's dtype; ``unmerge`` subtracts the same delta, so the round trip is within one rounding of W's dtype.
        A bitsandbytes base is dequantised, added to and quantised again, with a warning (see ``layers/base.py``).
        """
        if self.merged_adapter is None and self.active_adapter is not None:
            add_to_weight(self.base_layer, self.merge_delta(self.active_adapter))
            self._shift_bias(self.active_adapter, 1.0)
            self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        if self.merged_adapter is not None:
            add_to_weight(self.base_layer, self.unmerge_delta(self.merged_adapter))
            self._shift_bias(self.merged_adapter, -1.0)
            self.merged_adapter = None

    def lora_bias(self, name: str) -> torch.Tensor | None:
        """B's bias of adapter ``name`` (``lora_bias=True``), else None."""
        lora_b = getattr(self, "lora_B", {})
        return lora_b[name].bias if name in lora_b else None

    def _shift_bias(self, name: str, sign: float) -> None:
        """Merging a ``lora_bias`` adapter adds ``s * bias`` to the base layer's bias; unmerging takes it out."""
        extra = self.lora_bias(name)
        if extra is not None:
            with torch.no_grad():
                self.base_layer.bias.add_(extra.to(self.base_layer.bias.dtype), alpha=sign * self.scaling[name])

    def check_mergeable(self) -> None:
        """Refuse a merge into a quantised weight lorakit cannot write back (see ``layers/base.py``)."""
        if self.active_adapter is not None and self.merged_adapter is None:
            check_mergeable(self.base_layer)
            if self.lora_bias(self.active_adapter) is not None and getattr(self.base_layer, "bias", None) is None:
                raise ValueError(f"adapter {self.active_adapter!r} has lora_bias=True, but its layer has no bias to "
                                 "merge it into; keep it unmerged, or train it with lora_bias=False")

    def _uses_adapter(self) -> bool:
        return self.active_adapter is not None and not self.disabled and self.merged_adapter is None

    def _dropout_active(self, name: str) -> bool:
        return self.training and not isinstance(self.lora_dropout[name], nn.Identity)

    # -- PiSSA starts (only LoRALinear has any) ---------------------------------------------------
    def pissa_initial(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A0, B0)``, adapter ``name``'s factors at a PiSSA (``init="svd"``) start, or None for other inits.

        The original base weight is ``W + s B0 A0`` (W the residual left in ``base_layer``).
        """
        return None

    def _restore_pissa_start(self, name: str) -> None:
        """Give W back the part a PiSSA adapter took out at its start (nothing for other inits)."""

    # -- PEFT's tensors ---------------------------------------------------------------------------
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's key suffixes (``lora_A.weight`` ..., ``lora_magnitude_vector``)."""
        state = {key: tensor for key, tensor in self._peft_items(name)}
        if self.lora_bias(name) is not None:
            state["lora_B.bias"] = self.lora_bias(name)
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapter}, merged={self.merged_adapter}"


def init_a(a: torch.Tensor, init: str) -> None:
    """A's start: N(0, 1) for 'gaussian' (the seeds'), else Kaiming-uniform as nn.Linear (B starts at 0)."""
    nn.init.normal_(a) if init == "gaussian" else nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class LoRALinear(PiSSAStarts, LoRAWrapper):
    """LoRA for ``nn.Linear`` and Hugging Face ``Conv1D`` (whose weight is stored transposed)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_hf_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer, self.fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.pissa_start = nn.ModuleDict()

    def _weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view for Conv1D, dequantised for a bitsandbytes base."""
        w = dense_weight(self.base_layer)
        return w.t() if self.fan_in_fan_out else w

    def _factor_stores(self):
        return (self.lora_A, self.lora_B)

    def _add_factors(self, name: str, rank: int, like: dict) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, **like)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, **like)

    def _init_factors(self, name: str, init: str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init == "svd":
                self._init_pissa(name, a, b)
                return
            init_a(a, init)
            nn.init.zeros_(b)

    def _oriented(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    @staticmethod
    def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = merge_dtype(a.dtype)
        return (b.to(dtype) @ a.to(dtype)) * scale  # (out, in), in float32 or wider

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B A`` shaped like ``base_layer.weight``, in float32 (or wider: float64 factors stay float64)."""
        return self._oriented(self._delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]))

    def _peft_items(self, name: str):
        yield "lora_A.weight", self.lora_A[name].weight
        yield "lora_B.weight", self.lora_B[name].weight

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _dense_matrix(self) -> torch.Tensor:
        return self._weight()

    def _weight_times(self, a: torch.Tensor) -> torch.Tensor:
        """``W A^T`` (out, r), from the dense (dequantised) weight."""
        return self._without_bias(a).t()

    def _without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` in x's dtype (the base layer's own forward is not used: bitsandbytes' CPU kernel keeps state
        between calls of other shapes, and hooks would see lorakit's internal products)."""
        return F.linear(x, self._weight().to(x.dtype))

    def _weight_key(self) -> tuple:
        """A quantised weight changes when a merge replaces it, or when bitsandbytes re-packs it for its CPU kernel at
        the first eval forward (its block scales rounded to bf16)."""
        weight = self.base_layer.weight
        if quantisation(self.base_layer) is None:
            return super()._weight_key()
        return id(weight), bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed is not None and not self.disabled:
            return self._mixed_forward(x)
        if not self._uses_adapter():
            out = self.base_layer(x)
        elif self.active_adapter in self.lora_magnitude_vector and self._dropout_active(self.active_adapter):
            a, b = self.lora_A[self.active_adapter].weight, self.lora_B[self.active_adapter].weight
            out = self._dora_forward(x, self.active_adapter, lambda h: F.linear(F.linear(h, a), b), self._without_bias)
        else:  # LoRA, fused where it can be; DoRA without dropout rescales that output (see _dora_output)
            name, base = self.active_adapter, self.base_layer
            a, b, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            weight, bias = base.weight, getattr(base, "bias", None)
            low_bias = self.lora_B[name].bias
            if low_bias is None and fused_path_applies(base, x, weight, bias, a, b, self._dropout_active(name)):
                weight = weight.t() if self.fan_in_fan_out else weight
                if torch.is_grad_enabled():
                    out = FusedLoRALinear.apply(x, weight, bias, a, b, s)
                else:  # inference skips the autograd function's own cost
                    out = fused_linear(x, weight, bias, a, b, s)[0]
            else:
                out = self.base_layer(x)
                low = F.linear(F.linear(self.lora_dropout[name](x.to(a.dtype)), a), b, low_bias)  # (..., out)
                out = out + (low * s).to(out.dtype)
            if name in self.lora_magnitude_vector:
                out = self._dora_output(out, self.dora_scale(name))
        if len(self.pissa_start):
            out = self._add_pissa_starts(x, out)
        return out

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        out, rows, a = self.base_layer(x), self._mixed_rows(x.shape[0]), self.mixed["a"]
        if a is None:
            return out
        if self.mixed["g"] is not None:
            out = self._mixed_gain(out, rows)
        x3 = x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
        h_t = torch.bmm(a[rows], x3.transpose(1, 2))  # (batch, r, N): the rank-r side first, as the fused path
        return self._mixed_up(h_t.transpose(1, 2), rows, out)
