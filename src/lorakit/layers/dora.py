"""DoRA (arXiv 2402.09353): a LoRA adapter whose weight is split into a magnitude and a direction.

The adapted weight is ``m / ||W + s B A|| * (W + s B A)``: ``m`` is a trained vector, one entry per output
(row of W), and the norm is each row's L2 norm over the input dimension (for a convolution, over the input
channels and the kernel), **detached** from the gradient as the paper's section 4.3 and PEFT do. So a DoRA
layer computes ``g * (W x + s B A x) + bias`` with ``g = m / ||W + s B A||``; ``m`` starts at ``||W||``, so a
new adapter leaves the outputs unchanged.

The norm is computed without forming ``W + s B A``:
``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (A W_i^T) + s^2 B_i (A A^T) B_i^T``.
``||W||^2`` is computed once per version of W (W is frozen); the rest costs one (out, in) x (in, r) product per
step, and no (out, in) temporary. In eval mode an unchanged adapter's norm is not recomputed either: the cache is
keyed on the tensors' identities and version counters (``load_adapter`` and in-place writes bump them) and starts
afresh at every ``train()`` / ``eval()``, since a fused optimiser step changes A, B and m without bumping them.
"""
from __future__ import annotations

import torch

from .base import dense_weight

Key = tuple


def version_key(*tensors: torch.Tensor) -> Key:
    """Changes whenever one of ``tensors`` is replaced (a new object or storage) or written in place."""
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def no_autocast(device: torch.device):
    """A norm is computed in float32 (or wider) even inside ``torch.autocast``."""
    kind = device.type if device.type in ("cuda", "cpu", "xpu", "mps", "hpu") else "cpu"
    return torch.autocast(kind, enabled=False)


def norms_from_parts(square: torch.Tensor, wa: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``||W_i + s (B A)_i||`` for every row i from ``square`` = ``(W * W).sum(1)`` (out,), ``wa`` = ``W A^T``
    (out, r), ``a`` (r, cols) and ``b`` (out, r); in float32 (or wider)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    with no_autocast(a.device), torch.no_grad():
        a, b = a.detach().to(dtype), b.detach().to(dtype)
        cross = (wa.to(dtype) * b).sum(1)  # B_i . (A W_i^T)
        low = ((b @ (a @ a.t())) * b).sum(1)  # ||(B A)_i||^2
        return (square.to(dtype) + (2 * scale) * cross + (scale * scale) * low).clamp_min(0).sqrt()


def row_norms(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``||W_i + s (B A)_i||`` for ``weight`` (out, cols), ``a`` (r, cols), ``b`` (out, r), without forming ``B A``."""
    with no_autocast(weight.device), torch.no_grad():
        w = weight.to(torch.promote_types(a.dtype, torch.float32))
        return norms_from_parts(base_squares(w), w @ a.detach().to(w.dtype).t(), a, b, scale)


class NormCache:
    """The per-layer cache of ``||W||^2`` (any mode) and of whole norms (eval mode only), by adapter name."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], tuple[Key, torch.Tensor]] = {}

    def get(self, kind: str, name: str, key: Key, compute) -> torch.Tensor:
        hit = self.entries.get((kind, name))
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self.entries[(kind, name)] = (key, value)
        return value

    def drop(self, name: str) -> None:
        self.entries = {k: v for k, v in self.entries.items() if k[1] != name}

    def drop_adapter_values(self) -> None:
        """Forget the norms and gains (not ``||W||^2``): the optimiser may have changed A, B or m in place without
        bumping their version counters (fused AdamW does not)."""
        self.entries = {k: v for k, v in self.entries.items() if k[0] == "square"}


def magnitude_shape(weight_shape: torch.Size) -> tuple[int, ...]:
    """PEFT's shape of ``lora_magnitude_vector``: (out,) for a Linear, (1, out, 1, ...) for a convolution."""
    out = weight_shape[0]
    return (out,) if len(weight_shape) == 2 else (1, out, *[1] * (len(weight_shape) - 2))


def base_squares(weight: torch.Tensor) -> torch.Tensor:
    """``(W * W).sum(1)`` in float32 (or wider): each row's squared norm."""
    with no_autocast(weight.device), torch.no_grad():
        w = weight.to(torch.promote_types(weight.dtype, torch.float32))
        return (w * w).sum(1)


def merged_delta(weight: torch.Tensor, delta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """What a DoRA merge adds to W: ``g (W + s B A) - W`` (``delta`` is ``s B A``, g broadcast over W's rows)."""
    return (g - 1) * weight + g * delta


def unmerged_delta(merged: torch.Tensor, delta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """What a DoRA unmerge adds to the merged W': ``W' / g - s B A - W'`` (g as it was at the merge)."""
    return merged * (1 / g - 1) - delta


class DoRALayer:
    """What a LoRA wrapper adds for its DoRA adapters (mixed into :class:`~lorakit.layers.lora.LoRAWrapper`).

    A DoRA adapter is a LoRA adapter plus ``lora_magnitude_vector[name]`` (PEFT's name and shape). The wrapper
    provides ``_factors(name)`` (A as (r, cols), B as (out, r)), ``_dense_matrix()`` (W as (out, cols)),
    ``_weight_times(a)`` (``W A^T``, (out, r)), ``_weight_key()`` and ``_magnitude_shape()``.
    """

    def _init_dora(self) -> None:
        self.lora_magnitude_vector = torch.nn.ParameterDict()
        self._norms = NormCache()
        self._merged_scale: torch.Tensor | None = None  # g at the time of the merge, which unmerge divides out

    def train(self, mode: bool = True):
        """Switching between train and eval starts the eval cache afresh (as PEFT clears its DoRA cache)."""
        if hasattr(self, "_norms"):
            self._norms.drop_adapter_values()
        return super().train(mode)

    def _add_magnitude(self, name: str) -> None:
        """m = ||W + s B A|| at the start, so the new adapter leaves the outputs unchanged."""
        a = self._factors(name)[0]
        norm = self._compute_norm(name)
        self.lora_magnitude_vector[name] = torch.nn.Parameter(norm.to(a.dtype).view(self._magnitude_shape()))

    def _compute_norm(self, name: str) -> torch.Tensor:
        a, b = (t.detach() for t in self._factors(name))
        square = self._norms.get("square", "", self._weight_key(), lambda: base_squares(self._dense_matrix()))
        with no_autocast(a.device), torch.no_grad():
            wa = self._weight_times(a.to(torch.promote_types(a.dtype, torch.float32)))
        return norms_from_parts(square, wa, a, b, self.scaling[name])

    def _weight_key(self) -> Key:
        """Changes when W changes (its tensor's identity, storage and version counter)."""
        return version_key(self.base_layer.weight)

    def _norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row; in eval mode, computed again only when W, A or B changed."""
        if self.training:
            return self._compute_norm(name)
        key = (*self._weight_key(), *version_key(*self._factors(name)), self.scaling[name])
        return self._norms.get("norm", name, key, lambda: self._compute_norm(name))

    def dora_scale(self, name: str) -> torch.Tensor:
        """``g = m / ||W + s B A||`` shaped like m; the gradient reaches m only (the norm is detached). In eval mode
        without autograd, g itself is kept until W, A, B or m change."""
        m = self.lora_magnitude_vector[name]
        if self.training or torch.is_grad_enabled():
            return m / self._norm(name).view(m.shape).to(m.dtype)
        key = (*self._weight_key(), *version_key(*self._factors(name), m),
               self.scaling[name])
        return self._norms.get("gain", name, key, lambda: m / self._norm(name).view(m.shape).to(m.dtype))

    def _dora_forward(self, x: torch.Tensor, name: str, low_of, plain_of) -> torch.Tensor:
        """``base(x) + (g - 1) (W x) + g s B A x`` (PEFT's form of ``g (W x + s B A x) + bias``).

        ``low_of(x)`` is ``B A x``, ``plain_of(x)`` is ``W x`` without the bias. With dropout in training the
        dropped input goes through W too (as PEFT), which costs a second product with W.
        """
        out, a, g = self.base_layer(x), self._factors(name)[0], self.dora_scale(name)
        xd = self.lora_dropout[name](x.to(a.dtype))
        if self._dropout_active(name):
            plain = plain_of(xd)
        else:
            bias = getattr(self.base_layer, "bias", None)
            plain = out if bias is None else out - bias.view(g.shape).to(out.dtype)
        return out + ((g - 1) * plain + g * (low_of(xd) * self.scaling[name])).to(out.dtype)

    def _dora_output(self, lora_out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g (W x + s B A x) + bias`` from LoRA's output ``W x + bias + s B A x``: two passes over the output, so
        the LoRA part keeps its fused path (without dropout; with dropout see :meth:`_dora_forward`)."""
        bias = getattr(self.base_layer, "bias", None)
        out = g * lora_out
        return (out if bias is None else out + (1 - g) * bias.view(g.shape)).to(lora_out.dtype)

    def _oriented_scale(self, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """g shaped to scale the rows of the stored weight (its columns for a Conv1D, stored (in, out))."""
        return g.reshape(1, -1) if getattr(self, "fan_in_fan_out", False) else g.reshape(-1, *[1] * (weight.dim() - 1))

    def merge_delta(self, name: str) -> torch.Tensor:
        """What a merge adds to W: ``s B A``, or for DoRA ``g (W + s B A) - W`` (g from the unmerged W)."""
        delta = self.delta_weight(name)
        if name not in self.lora_magnitude_vector:
            return delta
        w = dense_weight(self.base_layer).to(delta.dtype)
        self._merged_scale = self.dora_scale(name).detach().to(delta.dtype)
        return merged_delta(w, delta, self._oriented_scale(self._merged_scale, w))

    def unmerge_delta(self, name: str) -> torch.Tensor:
        """What an unmerge adds to W: ``-s B A``, or for DoRA ``W' / g - s B A - W'`` (g kept from the merge)."""
        delta = self.delta_weight(name)
        if name not in self.lora_magnitude_vector:
            return -delta
        w = dense_weight(self.base_layer).to(delta.dtype)
        g, self._merged_scale = self._oriented_scale(self._merged_scale, w), None
        return unmerged_delta(w, delta, g)
