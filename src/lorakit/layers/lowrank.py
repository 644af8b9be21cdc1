"""Low-rank layers: what a compressed layer is after C-LoRA or SVD, ``x -> B (A x) + C``.

Only the two factors and the bias are stored; any scale is folded into them. A layer with rank r costs
``r (in + out) + out`` numbers instead of ``in * out + out``.

Shapes: ``LowRankLinear`` A (r, in), B (out, r), bias C (out,).
``LowRankConv2d`` A (r, in, kh, kw) is a convolution with the original kernel, stride, padding and dilation
giving r channels; B (out, r) is a 1x1 convolution back to ``out`` channels; bias C (out,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """``y = B (A x) + C``; a drop-in replacement for an ``nn.Linear`` of the same in/out features."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)
        nn.init.kaiming_uniform_(self.B, a=5 ** 0.5)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """A layer computing ``b @ (a @ x) + bias`` with copies of the given tensors."""
        layer = cls(a.shape[1], b.shape[0], a.shape[0], bias=bias is not None)
        layer.to(dtype=a.dtype, device=a.device)
        with torch.no_grad():
            layer.A.copy_(a)
            layer.B.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def weight(self) -> torch.Tensor:
        """The dense (out, in) matrix ``B A`` this layer applies (built only on request)."""
        return self.B @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)  # (..., r) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class LowRankConv2d(nn.Module):
    """A rank-r ``nn.Conv2d``: a conv to r channels with the original kernel, then a 1x1 conv and bias C."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.A = nn.Parameter(torch.empty(rank, in_channels, *self.kernel_size))
        self.B = nn.Parameter(torch.empty(out_channels, rank))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)
        nn.init.kaiming_uniform_(self.B, a=5 ** 0.5)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int, bias: bool = True) -> "LowRankConv2d":
        """An (uninitialised) low-rank layer with ``conv``'s channels, kernel, stride, padding and dilation."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"low-rank Conv2d needs groups=1 and padding_mode='zeros', got groups={conv.groups}, "
                             f"padding_mode={conv.padding_mode!r}")
        layer = cls(conv.in_channels, conv.out_channels, rank, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=bias)
        return layer.to(dtype=conv.weight.dtype, device=conv.weight.device)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor,
                     bias: torch.Tensor | None = None) -> "LowRankConv2d":
        """Geometry from ``conv``; A (r, in, kh, kw) or (r, in*kh*kw), B (out, r)."""
        layer = cls.like(conv, a.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.A.copy_(a.reshape(layer.A.shape))
            layer.B.copy_(b.reshape(layer.B.shape))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def weight(self) -> torch.Tensor:
        """The dense (out, in, kh, kw) kernel ``B A``."""
        return (self.B @ self.A.flatten(1)).view(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.A, None, self.stride, self.padding, self.dilation)  # (N, r, H', W')
        return F.conv2d(h, self.B[:, :, None, None], self.bias)  # (N, out, H', W')

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, rank={self.rank}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
