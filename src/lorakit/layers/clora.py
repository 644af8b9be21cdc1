"""C-LoRA decaying layers (SEEDS.md B): while training, the frozen weight fades out and ``B A`` takes over.

    y = d(t) (W x + b)  +  noise(t) x  +  s B (A x)  +  C          s = alpha / rank

``d`` is the layer's ``decay`` buffer, set by :class:`lorakit.DecaySchedule` (1 -> ``decay_floor``). ``noise``
is a fresh random matrix shaped like W at every training forward, ~ N((1-d) m, (1-d^2) sigma^2) with m, sigma the
mean and std of W per output unit (Linear) or over the whole tensor (Conv2d), so ``d W + noise`` keeps W's
statistics while W's information fades. ``noise="scheduled"`` turns it off once d < 0.3, ``"none"`` never adds it.
Nothing is random in eval mode: the noise term is a training-time regulariser, like dropout, and is left out; the
layer starts in its base layer's train/eval mode and then follows the model's ``train()``/``eval()``.
The layer's activation is not part of it (the seed's flaw): it stays where it is in the model.

``init="svd"`` starts ``s B A`` at the top-r part of W (PiSSA-style) and leaves W the residual, so the output is
unchanged at the start and only the residual decays (its m, sigma drive the noise); ``init="random"`` is the
seed's (A variance-scaling uniform, B = 0).

When d reaches 0 the layer is ``s B A x + C`` alone, and :func:`lorakit.compress` swaps it for a
:class:`~lorakit.layers.lowrank.LowRankLinear` / ``LowRankConv2d``.

Shapes: Linear A (r, in), B (out, r); Conv2d A (r, in, kh, kw) with the base's geometry, B (out, r, 1, 1); C (out,).

Precision and devices: A, B, C live on the base weight's device in the ``adapter_dtype`` rule's dtype (float32 on a
bf16/fp16 base by default); the low-rank path runs in that dtype and is cast to the dense path's. The forward never
reads a tensor back to the host: d is mirrored as a Python float (``set_decay``), re-read only if the buffer was
written some other way (then once, after loads, moves or a direct ``decay.fill_``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLoRAConfig
from .lowrank import LowRankConv2d, LowRankLinear
from .precision import factory_kwargs

NOISE_OFF_BELOW = 0.3
"""``noise="scheduled"`` adds noise only while d >= this value (the seed's threshold)."""


class CLoRALayer(nn.Module):
    """Wrapper around an ``nn.Linear`` or ``nn.Conv2d`` (``base_layer``) whose weight decays under a schedule.

    One C-LoRA adapter per layer: the decay of W is the layer's, not the adapter's.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Conv2d) and (base_layer.groups != 1 or base_layer.padding_mode != "zeros"):
            raise ValueError(f"C-LoRA needs convolutions with groups=1 and padding_mode='zeros', got "
                             f"groups={base_layer.groups}, padding_mode={base_layer.padding_mode!r}")
        self.base_layer = base_layer
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_C = nn.ParameterDict()
        self.configs: dict[str, CLoRAConfig] = {}
        self.active_adapter: str | None = None
        self.merged_adapter = None  # C-LoRA never merges; the attribute is part of the wrapper protocol
        self.disabled = False
        device = base_layer.weight.device
        self.register_buffer("decay", torch.ones((), device=device))
        self.register_buffer("noise_mean", torch.zeros((), device=device), persistent=False)
        self.register_buffer("noise_std", torch.zeros((), device=device), persistent=False)
        self._decay_seen: tuple | None = None  # (buffer, its _version, d as a float): the host mirror of d
        self._remember_decay(1.0)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.train(base_layer.training)  # a model put in eval() before inject stays in eval

    # -- adapters ---------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def add_adapter(self, name: str, cfg: CLoRAConfig) -> None:
        if self.configs:
            raise ValueError(f"this layer already holds C-LoRA adapter {self.adapter_names[0]!r}; W decays once, "
                             "so a layer takes one C-LoRA adapter (delete_adapter it first)")
        base, rank = self.base_layer, cfg.rank
        limit = min(self._weight_matrix().shape)
        if rank >= limit:
            raise ValueError(f"rank {rank} >= min(out, in) = {limit} of this {type(base).__name__}: no compression")
        like = factory_kwargs(base.weight, cfg.adapter_dtype)
        if self.is_conv:
            self.lora_A[name] = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                          base.dilation, bias=False, **like)
            self.lora_B[name] = nn.Conv2d(rank, base.out_channels, 1, bias=False, **like)
        else:
            self.lora_A[name] = nn.Linear(base.in_features, rank, bias=False, **like)
            self.lora_B[name] = nn.Linear(rank, base.out_features, bias=False, **like)
        if cfg.bias:
            self.lora_C[name] = nn.Parameter(torch.zeros(self._weight_matrix().shape[0], **like))
        self.configs[name] = cfg
        self.active_adapter = name
        self._init_factors(name, cfg)
        self._set_noise_statistics()
        self.train(self.training)

    def _weight_matrix(self) -> torch.Tensor:
        """W as an (out, in * kh * kw) view."""
        return self.base_layer.weight.flatten(1)

    def _init_factors(self, name: str, cfg: CLoRAConfig) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if cfg.init == "svd":
                # Top-r part of W into s B A; W keeps the residual, so the output is unchanged at the start and
                # only the residual decays. The initial factors are kept to give W back on delete/disable.
                w = self._weight_matrix()
                u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
                root = sv[:cfg.rank].sqrt() / math.sqrt(cfg.scale)
                b.copy_((u[:, :cfg.rank] * root).view_as(b))
                a.copy_((root[:, None] * vh[:cfg.rank]).view_as(a))
                self.register_buffer("svd_init_delta_A", a.detach().clone(), persistent=False)
                self.register_buffer("svd_init_delta_B", b.detach().clone(), persistent=False)
                w.sub_(self._delta(a, b, cfg.scale))  # delta in float32 (or wider), rounded once into W
            else:
                # The seed's Keras VarianceScaling(1, fan_in, uniform): U(-sqrt(3 / fan_in), +sqrt(3 / fan_in)).
                bound = math.sqrt(3.0 / a[0].numel())
                nn.init.uniform_(a, -bound, bound)
                nn.init.zeros_(b)

    @staticmethod
    def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (b.flatten(1).to(dtype) @ a.flatten(1).to(dtype)) * scale  # (out, in * kh * kw)

    def _set_noise_statistics(self) -> None:
        """m and sigma of the decaying W: per output unit for Linear (out, 1), per tensor for Conv2d."""
        w = self.base_layer.weight.detach()
        if self.is_conv:
            self.noise_mean, self.noise_std = w.mean(), w.std()
        else:
            self.noise_mean, self.noise_std = w.mean(1, keepdim=True), w.std(1, keepdim=True)

    def delete_adapter(self, name: str) -> None:
        cfg = self.configs.pop(name)
        if cfg.init == "svd":
            with torch.no_grad():
                self._weight_matrix().add_(self._delta(self.svd_init_delta_A, self.svd_init_delta_B, cfg.scale))
            del self.svd_init_delta_A, self.svd_init_delta_B
        del self.lora_A[name], self.lora_B[name]
        if name in self.lora_C:
            del self.lora_C[name]
        self.set_decay(1.0)
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        params = []
        for n in self.adapter_names if name is None else [name]:
            params += [self.lora_A[n].weight, self.lora_B[n].weight]
            params += [self.lora_C[n]] if n in self.lora_C else []
        return params

    def merge(self) -> None:
        raise ValueError("C-LoRA layers do not merge into W (W decays away); train to the end of the schedule "
                         "and call lorakit.compress(model) to get the low-rank model")

    def unmerge(self) -> None:
        pass

    # -- checkpoints ------------------------------------------------------------------------------
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        state = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight,
                 "clora_decay": self.decay}
        if name in self.lora_C:
            state["lora_C"] = self.lora_C[name]
        return state

    # -- the decay d, on the device and mirrored on the host ----------------------------------------
    def set_decay(self, d: float) -> None:
        """Set d in the ``decay`` buffer and its host mirror together (what ``DecaySchedule`` calls)."""
        self.decay.fill_(d)
        self._remember_decay(d)

    def decay_value(self) -> float:
        """d as a Python float, without a device read unless the buffer was written behind ``set_decay``'s back."""
        buffer, seen = self.decay, self._decay_seen
        if seen is None or seen[0] is not buffer or seen[1] != buffer._version:
            self._remember_decay(float(buffer))  # loaded, moved, or filled directly: read it once
        return self._decay_seen[2]

    def _remember_decay(self, d: float) -> None:
        self._decay_seen = (self.decay, self.decay._version, float(d))

    # -- forward ----------------------------------------------------------------------------------
    def noise_active(self) -> bool:
        """Whether this training step adds noise (never in eval mode)."""
        if not self.training or self.active_adapter is None:
            return False
        mode, d = self.configs[self.active_adapter].noise, self.decay_value()
        return d < 1.0 and (mode == "always" or (mode == "scheduled" and d >= NOISE_OFF_BELOW))

    def sample_noise(self) -> torch.Tensor:
        """One draw of the noise matrix, shaped like W: N((1-d) m, (1-d^2) sigma^2) elementwise."""
        d = self.decay_value()
        w = self.base_layer.weight
        mean = (1.0 - d) * self.noise_mean
        std = math.sqrt(max(1.0 - d * d, 0.0)) * self.noise_std
        return torch.randn_like(w).mul_(std).add_(mean)  # Linear: (out, 1) statistics broadcast along rows

    def _dense_path(self, x: torch.Tensor) -> torch.Tensor | None:
        """``d base_layer(x) + noise x``, or None when both vanish (d = 0 and no noise)."""
        d = self.decay_value()
        noise = self.sample_noise() if self.noise_active() else None
        if d == 0.0 and noise is None:
            return None
        out = None
        if d != 0.0:
            out = self.base_layer(x)  # the base layer itself (hooks, subclasses), scaled
            out = out * d if d != 1.0 else out
        if noise is not None:
            base = self.base_layer
            noisy = (F.conv2d(x, noise, None, base.stride, base.padding, base.dilation) if self.is_conv
                     else F.linear(x, noise))
            out = noisy if out is None else out + noisy
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.active_adapter is None:
            out = self.base_layer(x)
            if self.disabled and hasattr(self, "svd_init_delta_A"):  # the original W, not its residual
                cfg = self.configs[self.adapter_names[0]]
                low = self._low_rank(x, self.svd_init_delta_A, self.svd_init_delta_B, cfg.scale, None)
                out = out + low.to(out.dtype)
            return out
        name = self.active_adapter
        low = self._low_rank(x, self.lora_A[name].weight, self.lora_B[name].weight, self.configs[name].scale,
                             self.lora_C[name] if name in self.lora_C else None)
        dense = self._dense_path(x)
        return low.to(x.dtype) if dense is None else dense + low.to(dense.dtype)

    def _low_rank(self, x, a, b, scale, c) -> torch.Tensor:
        """``s B (A x) + C`` in the factors' dtype."""
        x = x.to(a.dtype)
        if self.is_conv:
            base = self.base_layer
            h = F.conv2d(x, a, None, base.stride, base.padding, base.dilation)  # (N, r, H', W')
            out = F.conv2d(h, b * scale, c)  # (N, out, H', W')
        else:
            out = F.linear(F.linear(x, a), b * scale, c)  # (..., r) -> (..., out)
        return out

    def to_low_rank(self) -> nn.Module:
        """The compressed layer ``B' A x + C`` with ``B' = s B`` (what this layer computes at d = 0).

        It takes the base layer's dtype (a bf16 model compresses to a bf16 model), whatever the factors' dtype.
        """
        name = self.active_adapter
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else self.lora_A[name].weight.dtype
        a = self.lora_A[name].weight.detach().to(dtype)
        b = (self.lora_B[name].weight.detach() * self.configs[name].scale).to(dtype)  # scaled in the factors' dtype
        c = self.lora_C[name].detach().to(dtype) if name in self.lora_C else None
        if self.is_conv:
            return LowRankConv2d.from_factors(self.base_layer, a, b.flatten(1), c)
        return LowRankLinear.from_factors(a, b, c)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapter}, decay={self.decay_value():.4f}"


def _refresh_after_load(layer: CLoRALayer, incompatible_keys) -> None:
    """After ``load_state_dict`` (base weight and decay included): d's host mirror and the noise statistics."""
    if layer.decay.is_meta:
        return
    layer._remember_decay(float(layer.decay))
    if layer.adapter_names:
        layer._set_noise_statistics()


def clora_wrapper_for(module: nn.Module) -> type[CLoRALayer] | None:
    """C-LoRA supports ``nn.Linear`` and ``nn.Conv2d``."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return CLoRALayer
    return None
