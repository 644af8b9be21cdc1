"""LoRA on ``nn.Embedding`` (PEFT's ``lora_embedding_A/B``): ``E[x] + s * A^T[x] B^T``, with DoRA (a magnitude per
embedding coordinate) and mixed batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRAWrapper, init_a
from .precision import merge_dtype


class LoRAEmbedding(LoRAWrapper):
    """LoRA for ``nn.Embedding``: ``E[x] + s * A^T[x] B^T``; dropout does not apply to indices."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _factor_stores(self):
        return (self.lora_embedding_A, self.lora_embedding_B)

    def _add_factors(self, name: str, rank: int, like: dict) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(rank, num, **like))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, rank, **like))

    def _init_factors(self, name: str, init: str) -> None:
        if init == "svd":
            raise ValueError("init='svd' is supported for Linear and Conv1D layers; use 'kaiming' or 'gaussian' for embeddings")
        with torch.no_grad():
            init_a(self.lora_embedding_A[name], init)
            nn.init.zeros_(self.lora_embedding_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s (B A)^T`` shaped like the (num, dim) table, in float32 (or wider)."""
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        dtype = merge_dtype(a.dtype)
        return (b.to(dtype) @ a.to(dtype)).t() * self.scaling[name]  # (num, dim)

    def _peft_items(self, name: str):
        yield "lora_embedding_A", self.lora_embedding_A[name]
        yield "lora_embedding_B", self.lora_embedding_B[name]

    # DoRA, as PEFT: the outputs are the dim embedding coordinates, so W is the table transposed, (dim, num), and
    # each coordinate's norm is over the vocabulary; m and g have shape (dim,).
    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _dense_matrix(self) -> torch.Tensor:
        return self.base_layer.weight.t()

    def _weight_times(self, a: torch.Tensor) -> torch.Tensor:
        return (a @ self.base_layer.weight.to(a.dtype)).t()  # W A^T = (A E)^T, (dim, r)

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (self.base_layer.weight.shape[1],)

    def _oriented_scale(self, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return g.reshape(1, -1)  # the table's columns are the outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.mixed is not None and not self.disabled:
            return self._mixed_forward(x, out)
        if not self._uses_adapter():
            return out
        name, base = self.active_adapter, self.base_layer
        rows = F.embedding(x, self.lora_embedding_A[name].t(), base.padding_idx, base.max_norm,
                           base.norm_type, base.scale_grad_by_freq, base.sparse)  # (..., r)
        out = out + ((rows @ self.lora_embedding_B[name].t()) * self.scaling[name]).to(out.dtype)
        return self._dora_output(out, self.dora_scale(name)) if name in self.lora_magnitude_vector else out

    def set_mixed(self, names: list[str | None] | None) -> None:
        super().set_mixed(names)
        if self.mixed is not None and self.mixed["a"] is not None:  # one lookup table: row j * num + t = A_j[:, t]
            slots, rank, num = self.mixed["a"].shape
            self.mixed["table"] = self.mixed["a"].transpose(1, 2).reshape(slots * num, rank)

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rows = self._mixed_rows(x.shape[0])
        if self.mixed["a"] is None:
            return out
        if self.mixed["g"] is not None:
            out = self._mixed_gain(out, rows)
        num = self.mixed["a"].shape[2]
        ids = x + rows.view(-1, *[1] * (x.dim() - 1)) * num
        h = F.embedding(ids, self.mixed["table"]).reshape(x.shape[0], -1, self.mixed["table"].shape[1])
        return self._mixed_up(h, rows, out)
