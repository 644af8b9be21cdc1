"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` (PEFT's layout): A a convolution with the base's kernel, B a 1x1 one."""
from __future__ import annotations

import torch
from torch import nn

from .dora import magnitude_shape
from .lora import LoRAWrapper, init_a
from .precision import merge_dtype


class LoRAConv(LoRAWrapper):
    """LoRA for ``nn.Conv1d`` / ``nn.Conv2d``: A is a conv with the base's kernel, B a 1x1 conv (as PEFT)."""

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions is not supported (groups={base_layer.groups}); use groups=1")
        self.conv_type = type(base_layer) if type(base_layer) in (nn.Conv1d, nn.Conv2d) else (
            nn.Conv2d if base_layer.weight.dim() == 4 else nn.Conv1d)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _factor_stores(self):
        return (self.lora_A, self.lora_B)

    def _add_factors(self, name: str, rank: int, like: dict) -> None:
        base = self.base_layer
        self.lora_A[name] = self.conv_type(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False,
            padding_mode=base.padding_mode, **like  # pads x as the base does, so merging changes nothing
        )
        self.lora_B[name] = self.conv_type(rank, base.out_channels, 1, bias=False, **like)

    def _init_factors(self, name: str, init: str) -> None:
        if init == "svd":
            raise ValueError("init='svd' is supported for Linear and Conv1D layers; use 'kaiming' or 'gaussian' for convolutions")
        with torch.no_grad():
            init_a(self.lora_A[name].weight, init)
            nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B A`` shaped like ``base_layer.weight``, in float32 (or wider)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in, *k), (out, r, 1...)
        dtype = merge_dtype(a.dtype)
        delta = b.flatten(1).to(dtype) @ a.flatten(1).to(dtype)  # (out, in * prod(k))
        return delta.view(self.base_layer.weight.shape) * self.scaling[name]

    def _peft_items(self, name: str):
        yield "lora_A.weight", self.lora_A[name].weight
        yield "lora_B.weight", self.lora_B[name].weight

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight.flatten(1), self.lora_B[name].weight.flatten(1)

    def _dense_matrix(self) -> torch.Tensor:
        return self.base_layer.weight.flatten(1)

    def _weight_times(self, a: torch.Tensor) -> torch.Tensor:
        return self.base_layer.weight.flatten(1).to(a.dtype) @ a.t()

    def _magnitude_shape(self) -> tuple[int, ...]:
        return magnitude_shape(self.base_layer.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name, base = self.active_adapter, self.base_layer
        if self._uses_adapter() and name in self.lora_magnitude_vector and self._dropout_active(name):
            return self._dora_forward(x, name, lambda h: self.lora_B[name](self.lora_A[name](h)),
                                      lambda h: base._conv_forward(h, base.weight.to(h.dtype), None))
        out = base(x)
        if not self._uses_adapter():
            return out
        dtype = self.lora_A[name].weight.dtype
        low = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x.to(dtype))))
        out = out + (low * self.scaling[name]).to(out.dtype)
        return self._dora_output(out, self.dora_scale(name)) if name in self.lora_magnitude_vector else out
