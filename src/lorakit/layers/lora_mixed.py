"""Per-row adapters for :func:`lorakit.mixed_batch`: a mixin of the LoRA wrappers (Linear and Embedding).

:meth:`MixedRows.set_mixed` stacks every adapter's factors once (the scale folded into B, a zero slot for the base),
and the layer's forward gathers each row's pair and runs batched products (``torch.bmm``).
"""
from __future__ import annotations

import torch


class MixedRows:
    """The mixed-batch state of a LoRA wrapper; uses its ``scaling``, ``_peft_items``, ``lora_bias``, ``base_layer``
    and DoRA's ``lora_magnitude_vector`` / ``dora_scale``."""

    mixed: dict | None = None
    """Per-row factors while :func:`lorakit.mixed_batch` is on (see :meth:`set_mixed`), else None."""

    def set_mixed(self, names: list[str | None] | None) -> None:
        """Row i uses adapter ``names[i]`` (None, or an adapter this layer lacks: no low-rank term); None: off.

        Stacks the factors once: ``a`` (k+1, r_max, in), ``b`` (k+1, out, r_max) with the scale folded in, slot k
        (and ranks below r_max) zero; ``rows`` (batch,) is each row's slot. Linear and Embedding layers only.
        With DoRA adapters, ``g`` (k+1, out) holds each slot's ``m / ||W + s B A||`` (1 for LoRA and the base),
        folded into ``b`` and applied to the row's ``W x``; else None.
        """
        if names is None:
            self.mixed = None
            return
        used = [n for n in dict.fromkeys(names) if n in self.scaling]
        rows = torch.tensor([used.index(n) if n in used else len(used) for n in names])
        if not used:
            self.mixed = {"rows": rows, "a": None, "b": None}
            return
        pairs = [tuple(t.detach() for _, t in self._peft_items(n)) for n in used]  # (A (r, in), B (out, r))
        rank, (a0, b0) = max(a.shape[0] for a, _ in pairs), pairs[0]
        a_stack = a0.new_zeros(len(used) + 1, rank, a0.shape[1])
        b_stack = a0.new_zeros(len(used) + 1, b0.shape[0], rank)
        gains = a0.new_ones(len(used) + 1, b0.shape[0]) if any(n in self.lora_magnitude_vector for n in used) else None
        for slot, (name, (a, b)) in enumerate(zip(used, pairs)):
            if name in self.lora_magnitude_vector:  # DoRA: g scales the row's W x, and is folded into its B
                gains[slot] = self.dora_scale(name).detach().reshape(-1).to(a0.dtype)
            a_stack[slot, : a.shape[0]] = a
            b_stack[slot, :, : a.shape[0]] = b * self.scaling[name] * (1 if gains is None else gains[slot, :, None])
        biases = None
        if any(self.lora_bias(n) is not None for n in used):  # lora_bias: each slot's s * bias (0 for the rest)
            biases = a0.new_zeros(len(used) + 1, b0.shape[0])
            for slot, name in enumerate(used):
                if self.lora_bias(name) is not None:
                    biases[slot] = self.lora_bias(name).detach() * self.scaling[name]
        self.mixed = {"rows": rows.to(a0.device), "a": a_stack, "b": b_stack, "g": gains, "c": biases}

    def _mixed_rows(self, batch: int) -> torch.Tensor:
        rows = self.mixed["rows"]
        if batch != rows.numel():
            raise ValueError(f"mixed_batch was given {rows.numel()} adapter names, but this batch has {batch} rows; "
                             "give one name per row (for beam search, each name num_beams times)")
        return rows

    def _mixed_gain(self, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``out`` with each DoRA row's ``W x`` scaled by its g (the bias stays as it is)."""
        g = self.mixed["g"][rows].view(out.shape[0], *[1] * (out.dim() - 2), out.shape[-1])
        bias = getattr(self.base_layer, "bias", None)
        plain = out if bias is None else out - bias.to(out.dtype)
        return out + ((g - 1) * plain).to(out.dtype)

    def _mixed_up(self, h: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus each row's ``s B h``; ``h`` is (batch, tokens, r_max), already projected by the row's A."""
        up = self.mixed["b"][rows].transpose(1, 2)  # (batch, r_max, out)
        if self.mixed.get("c") is not None:
            out = out + self.mixed["c"][rows].view(out.shape[0], *[1] * (out.dim() - 2), -1).to(out.dtype)
        if out.dtype == up.dtype and out.is_contiguous() and not torch.is_grad_enabled():
            out.view(h.shape[0], -1, out.shape[-1]).baddbmm_(h, up)  # in place, as the fused path adds
            return out
        return out + torch.bmm(h, up).reshape(out.shape).to(out.dtype)
