"""Hugging Face integration: :class:`Trainer`, a drop-in ``transformers.Trainer`` for lorakit models.

``transformers.Trainer`` already trains a lorakit model as it is (its adapters are ordinary parameters); what it
gets wrong are the files. Its checkpoints would hold the whole model under lorakit's module names, and it could
not resume from an adapter-only folder. This subclass changes only that:

- every checkpoint (``checkpoint-N/``) and ``save_model()`` folder is a PEFT-layout adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``, see :func:`lorakit.save_adapter`), next to the
  Trainer's usual optimizer, scheduler, RNG and trainer-state files;
- ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` read those folders back with
  :func:`lorakit.load_adapter` into the model's active adapter.

A model without lorakit adapters is saved and loaded exactly as ``transformers.Trainer`` does. Under
``torchrun`` with several processes, training equals one process on the global batch only with
``TrainingArguments(average_tokens_across_devices=False)``: otherwise the loss is normalised by the token count
over all devices, which changes the gradient scale for sequence tasks with padding.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from .checkpoint import CONFIG_FILE, load_adapter, save_adapter
from .inject import unwrap_model


def _lorakit_model(model) -> torch.nn.Module | None:
    model = unwrap_model(model)
    return model if getattr(model, "lorakit_configs", None) else None


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints are PEFT-layout adapter folders for a lorakit model."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _lorakit_model(self.model)
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(model, output_dir)  # every rank calls it; it gathers sharded adapters and rank 0 writes
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = _lorakit_model(model if model is not None else self.model)
        if target is None or not (Path(resume_from_checkpoint) / CONFIG_FILE).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(target, resume_from_checkpoint, name=target.lorakit_active)

    def _load_best_model(self) -> None:
        target = _lorakit_model(self.model)
        best = self.state.best_model_checkpoint
        if target is None or best is None or not (Path(best) / CONFIG_FILE).is_file():
            return super()._load_best_model()
        load_adapter(target, best, name=target.lorakit_active)
