"""The hooks of the training loop (:mod:`lorakit.train`): a loss and a prediction, each a function of
``(model, batch)``. A batch is a pair ``(inputs, labels)`` or a dict of tensors for a Hugging Face model."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

Batch = Any  # (inputs, labels) or a dict of tensors
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
PredictFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


def _logits(output: Any) -> torch.Tensor:
    """A model's logits, whether it returns a tensor or a Hugging Face ``ModelOutput``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy for ``(inputs, labels)``; for a dict batch, the loss the model itself returns."""
    if isinstance(batch, Mapping):
        loss = getattr(model(**batch), "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss for a dict batch: include 'labels' in it or pass loss_fn")
        return loss
    inputs, labels = batch
    return F.cross_entropy(_logits(model(inputs)), labels)


def distillation_loss(teacher: nn.Module, weight: float = 0.5, temperature: float = 2.0) -> LossFn:
    """A ``loss_fn`` that also learns from ``teacher``'s outputs (Hinton et al., 2015: knowledge distillation).

    loss = (1 - weight) x cross-entropy(labels) + weight x T^2 x KL(teacher || student), both softmaxed at
    temperature T. The teacher runs without gradients and must already be in eval mode (``teacher.eval()``), so
    that its dropout does not change its targets. For a compressed model, the teacher is the dense one it came from.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if teacher.training:
        raise ValueError("the teacher is in training mode: call teacher.eval() first, so dropout leaves its targets alone")

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            labels = batch["labels"]
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            student = _logits(model(**inputs))
            with torch.no_grad():
                target = _logits(teacher(**inputs))
        else:
            inputs, labels = batch
            student = _logits(model(inputs))
            with torch.no_grad():
                target = _logits(teacher(inputs))
        soft = F.kl_div(F.log_softmax(student.float() / temperature, dim=-1),
                        F.log_softmax(target.float() / temperature, dim=-1), log_target=True, reduction="batchmean")
        return (1 - weight) * F.cross_entropy(student, labels) + weight * temperature ** 2 * soft

    return loss_fn


def classify(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted class, label)`` per example; a dict batch carries its labels under ``"labels"``."""
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return _logits(model(**inputs)).argmax(dim=-1), batch["labels"]
    inputs, labels = batch
    return _logits(model(inputs)).argmax(dim=-1), labels
